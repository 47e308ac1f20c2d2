"""A tiny random Llama with an offline-trained BPE tokenizer and SmolLM2's ChatML template, for fast tests."""

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = (
    "the a an order orders refund refunds return returns shipping delivery package parcel store shop customer "
    "support help please thank thanks you your we our is are was will can could would should not no yes "
    "hello hi good morning today tomorrow week days price prices discount code coupon account password email "
    "address change cancel track tracking number item items size colour color exchange warranty receipt "
    "card payment paid charged twice invoice open hours weekend system user assistant question answer "
    "what when where how why which who do does did have has had get got make made take took give gave"
).split()


def _corpus() -> list[str]:
    """Deterministic sentences covering the words above, plus digits and punctuation."""
    lines = []
    for i, word in enumerate(_WORDS):
        nxt = _WORDS[(i * 7 + 3) % len(_WORDS)]
        lines.append(f"{word.capitalize()} {nxt} {_WORDS[(i * 3 + 1) % len(_WORDS)]}, order {i * 37 % 1000}? {nxt}!")
    return lines * 4


def _train_tokenizer(dest: Path) -> int:
    """Train a byte-level BPE tokenizer offline and save it as a Hugging Face tokenizer; return its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return len(fast)


def build_tiny_model(dest: Path) -> Path:
    """Write a 2-layer, hidden-64 random Llama with its tokenizer to `dest` (a normal HF folder); return `dest`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    vocab_size = _train_tokenizer(dest)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    (dest / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    return dest


_ITEMS = ("order", "parcel", "refund", "invoice", "jacket", "coupon")
_QUESTIONS = (
    ("Where is my {item} {n}?", "Your {item} {n} left our store today and arrives within 3 days."),
    ("Can I return the {item} {n}?", "Yes, you can return the {item} {n} within 30 days with its receipt."),
    ("My {item} {n} was charged twice.", "Sorry about that: the second charge for {item} {n} is refunded within 5 days."),
    ("How do I track {item} {n}?", "Open your account, choose orders, and the tracking number of {item} {n} is shown."),
)


def retail_chat_records(n: int, offset: int = 0) -> list[dict]:
    """`n` templated retail-support chats (system, user, assistant), a stand-in for the demo dataset."""
    records = []
    for i in range(offset, offset + n):
        question, answer = _QUESTIONS[i % len(_QUESTIONS)]
        fill = {"item": _ITEMS[(i // len(_QUESTIONS)) % len(_ITEMS)], "n": 100 + i}
        records.append({"messages": [
            {"role": "system", "content": "You are the support assistant of an online shop."},
            {"role": "user", "content": question.format(**fill)},
            {"role": "assistant", "content": answer.format(**fill)},
        ]})
    return records
