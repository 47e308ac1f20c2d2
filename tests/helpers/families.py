"""Tiny random models of real architectures with their real vocabularies, to test the training core per family.

Each family is 2 layers of hidden size 64 on a tokenizer from `tests.helpers.vocabs`, with the real
checkpoint's special-token ids, eos ids and chat-template habits. `build_family_model` writes a normal
Hugging Face folder that `from_pretrained` loads offline.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.vocabs import tokenizer_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The tiny shape every family shares; `num_key_value_heads` only where the architecture has grouped-query attention.
_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_GQA = dict(_SHAPE, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    vocab: str  # a name of tests.helpers.vocabs.VOCABS
    config: Callable[[], "PretrainedConfig"]  # makes the transformers config, with the vocabulary's token ids
    chat_template: str | None  # None: a base model, unless keeps_vocab_template
    eos_token_ids: tuple[int, ...]  # generation_config.json's eos_token_id
    quirk: str  # what this family reproduces that the others do not
    keeps_vocab_template: bool = False  # the chat template is the vocabulary's own
    eos_token: str | None = None  # the checkpoint's tokenizer eos, where it is not the vocabulary's
    special_tokens: tuple[str, ...] = ()  # added to the vocabulary as special tokens
    added_tokens: tuple[str, ...] = ()  # added to the vocabulary as ordinary tokens

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None or self.keeps_vocab_template


# Mistral-Instruct v0.3 style: the system prompt joins the last user turn; answers are trimmed and end in </s>.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in turns %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for m in turns %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' and loop.index0 == ns.last_user and system is defined %}"
    "{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- elif m['role'] == 'user' %}{{- '[INST] ' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- ' ' + m['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Llama-3 style: a header per turn, contents trimmed, <|eot_id|> after each; BOS written by the template.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen3 style ChatML: reasoning (`<think>...</think>`) is dropped from answers before the last user turn.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma style: no system role, the assistant is "model", contents trimmed, <end_of_turn> after each turn.
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def _llama2():
    from transformers import LlamaConfig

    return LlamaConfig(**_GQA, vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None)


def _mistral_instruct():
    from transformers import MistralConfig

    return MistralConfig(**_GQA, vocab_size=32000, max_position_embeddings=32768, sliding_window=None,
                         rope_theta=1e6, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _mistral_base():
    from transformers import MistralConfig

    return MistralConfig(**_GQA, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _falcon():
    from transformers import FalconConfig

    return FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                        vocab_size=65024, max_position_embeddings=2048, multi_query=True, parallel_attn=True,
                        new_decoder_architecture=False, bias=False, alibi=False, bos_token_id=11, eos_token_id=11,
                        pad_token_id=None)


def _llama3():
    from transformers import LlamaConfig

    return LlamaConfig(**_GQA, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       bos_token_id=128000, eos_token_id=128009, pad_token_id=None)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**_GQA, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**_GQA, head_dim=16, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(**_GQA, vocab_size=32064, max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000,
                      pad_token_id=32000)


def _gemma():
    from transformers import Gemma2Config

    return Gemma2Config(**_GQA, head_dim=16, query_pre_attn_scalar=16, vocab_size=32002,
                        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=None)


FAMILIES: dict[str, Family] = {
    "llama2": Family(
        "llama-spm", _llama2, None, (2,),
        "Llama-2-7b: a base model with no chat template and no pad token; SentencePiece that adds BOS"),
    "mistral": Family(
        "llama-spm", _mistral_instruct, MISTRAL_TEMPLATE, (2,),
        "Mistral-7B-Instruct-v0.3: the system prompt joins the last user turn, answers are trimmed and end in "
        "</s>, the template writes BOS that the tokenizer adds again"),
    "mistral-base": Family(
        "llama-spm", _mistral_base, None, (2,),
        "Mistral-7B-v0.1: a base model with a 4096-token sliding window"),
    "falcon": Family(
        "falcon", _falcon, None, (11,),
        "Falcon-7B: fused query_key_value with one shared key/value head, parallel attention, no BOS, "
        "bos = eos = <|endoftext|>, tied embeddings"),
    "llama3": Family(
        "llama-bpe", _llama3, LLAMA3_TEMPLATE, (128001, 128009),  # <|end_of_text|>, <|eot_id|>
        "Meta-Llama-3-8B-Instruct: turns end in <|eot_id|> (the tokenizer's eos) while the vocabulary's eos is "
        "<|end_of_text|>; byte-level BPE that adds BOS; no pad token",
        eos_token="<|eot_id|>"),
    "qwen2": Family(
        "qwen2", _qwen2, None, (151645, 151643),  # <|im_end|>, <|endoftext|>
        "Qwen2-0.5B-Instruct: ChatML that injects a default system prompt, no bos token, pad <|endoftext|>, "
        "the model's 151,936 rows outnumber the tokenizer's 151,646 tokens, tied embeddings",
        keeps_vocab_template=True, eos_token="<|im_end|>"),
    "qwen3": Family(
        "qwen2", _qwen3, QWEN3_TEMPLATE, (151645, 151643),  # <|im_end|>, <|endoftext|>
        "Qwen3: ChatML that drops <think> reasoning from answers before the last user turn, so an earlier turn "
        "renders differently from how it was generated; <think> and </think> are ordinary added tokens",
        eos_token="<|im_end|>", added_tokens=("<think>", "</think>")),
    "phi3": Family(
        "phi-3", _phi3, None, (32000, 32001, 32007),  # <|endoftext|>, <|assistant|>, <|end|>
        "Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj; the template drops system messages, writes "
        "BOS and <|assistant|> after every user turn; pad = eos = <|endoftext|>",
        keeps_vocab_template=True),
    "gemma": Family(
        "llama-spm", _gemma, GEMMA_TEMPLATE, (2, 32001),  # </s>, <end_of_turn>
        "Gemma-2-it: refuses a system role, the assistant is 'model', turns end in <end_of_turn> (an added "
        "special token, so the vocabulary grows to 32,002), tied embeddings and soft-capped logits",
        special_tokens=("<start_of_turn>", "<end_of_turn>")),
}


SAMPLE_CHATS: dict[str, list[dict]] = {
    "single_turn": [
        {"role": "user", "content": "Where is my order 1042?"},
        {"role": "assistant", "content": "Your order 1042 left our store today and arrives within 3 days."},
    ],
    "system": [
        {"role": "system", "content": "You are the support assistant of an online shop."},
        {"role": "user", "content": "Can I return a jacket after 20 days?"},
        {"role": "assistant", "content": "Yes: returns are accepted within 30 days with the receipt."},
    ],
    "multi_turn_system": [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Do you ship to Norway?"},
        {"role": "assistant", "content": "Yes, we ship to Norway in 5 to 7 days."},
        {"role": "user", "content": "And to Iceland?"},
        {"role": "assistant", "content": "Iceland takes 8 to 10 days."},
    ],
    "multi_turn_reasoning": [
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n17 * 3 is 51."},
        {"role": "user", "content": "And plus 9?"},
        {"role": "assistant", "content": "<think>\n51 + 9 = 60.\n</think>\n\nThat makes 60."},
    ],
    "unicode": [
        {"role": "user", "content": "Was kostet ein Korb Äpfel? 日本へ送れますか? 🦙"},
        {"role": "assistant", "content": "Ein Korb kostet 4,50 € — はい、送れます! 🍎✨"},
    ],
    "spaces": [
        {"role": "user", "content": "  why do   spaces matter?  "},
        {"role": "assistant", "content": "  Because\ttemplates may trim them.\n\nKeep both lines.  "},
    ],
    "numbers": [
        {"role": "user", "content": "Add 12345 and 678.9, then 3333 + 0.001."},
        {"role": "assistant", "content": "12345 + 678.9 = 13023.9 and 3333 + 0.001 = 3333.001 (1/2 of 6666.002)."},
    ],
}


def build_family_model(name: str, dest: Path) -> Path:
    """Write family `name`'s random model, tokenizer, generation config and chat template to `dest`; return it."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    family = FAMILIES[name]
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family.vocab))
    if family.eos_token:
        tokenizer.eos_token = family.eos_token
    if family.special_tokens:
        special = [AddedToken(t, normalized=False, special=True) for t in family.special_tokens]
        tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    if family.added_tokens:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in family.added_tokens])
    if not family.keeps_vocab_template:
        tokenizer.chat_template = family.chat_template
    tokenizer.save_pretrained(dest)

    config = family.config()
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{name}: {len(tokenizer)} tokens do not fit the config's vocab_size {config.vocab_size}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=list(family.eos_token_ids), pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(dest)
    return dest


def sample_rows(tokenizer, n: int = 4) -> list[dict]:
    """The first `n` sample chats as training rows (input ids and labels) for `tokenizer`."""
    from core.datasets.formats import to_example
    from worker.training import tokenize_example

    rows = []
    for chat in list(SAMPLE_CHATS.values())[:n]:
        ids, labels = tokenize_example(to_example({"messages": chat}, "chat"), tokenizer, 256, False)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def loss_and_grads(model, batch) -> tuple[float, list]:
    """One forward and backward: the loss and a copy of every trainable parameter's gradient."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]
