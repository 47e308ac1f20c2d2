"""Data to tokens: load JSONL, format with the chat template, tokenize with labels, split, pack."""

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.datasets.formats import Example, detect_format, to_example

IGNORE_INDEX = -100  # the label the loss skips


@dataclass
class TokenizedData:
    """Token rows ready for the collator, and what was dropped on the way."""

    rows: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def read_examples(path: Path) -> list[Example]:
    """Load data: every non-blank JSONL line as a normalised Example (validation has already accepted the file)."""
    examples = []
    with open(path, encoding="utf-8-sig") as lines:  # utf-8-sig drops a BOM some editors write
        for line in lines:
            if line.strip():
                record = json.loads(line)
                examples.append(to_example(record, detect_format(record)))
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one when fraction > 0), chosen by `seed`."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class TemplateMismatch(ValueError):
    """The chat template does not render an assistant turn's content verbatim, so its tokens cannot be found."""


@dataclass(frozen=True)
class Rendered:
    """An example as the exact text inference sees, and the character spans that carry loss."""

    text: str
    trained: list[tuple[int, int]]
    add_special_tokens: bool  # True for plain text (BOS where the tokenizer adds one); chat templates write their own
    append_eos: bool  # the template closes the final trained turn with no end-of-turn token: EOS is appended


def messages_of(turns) -> list[dict]:
    """A chat's turns as OpenAI chat messages."""
    return [{"role": t.role, "content": t.content} for t in turns]


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system prompt moved into the first user turn, for templates that refuse a system role (Gemma's)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system}\n\n{message['content']}"
            break
    return rest


def render_chat(messages: list[dict], tokenizer, **kwargs) -> str:
    """The conversation in the tokenizer's chat template; a refused system role is folded into the first user turn."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError:
        if not any(m["role"] == "system" for m in messages):
            raise
        return tokenizer.apply_chat_template(_fold_system(messages), tokenize=False, **kwargs)


REASONING_END = "</think>"
_TAG_OR_SPACE = re.compile(r"(\s+|<[^<>\s]{1,40}>)")


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Where `content` lies in `text` at or after `start`: verbatim, stripped, or with re-spaced tags.

    Templates strip contents (Llama-2) or re-space reasoning tags (Qwen3 writes `<think>\n...\n</think>\n\n`).
    """
    for candidate in (content, content.strip()):
        if candidate:
            at = text.find(candidate, start)
            if at >= 0:
                return at, at + len(candidate)
    chunks = [c for c in _TAG_OR_SPACE.split(content) if c and not c.isspace()]
    if not chunks:
        return None
    match = re.compile(r"\s*".join(re.escape(c) for c in chunks)).search(text, start)
    return (match.start(), match.end()) if match else None


def end_of_turn_tokens(tokenizer) -> tuple[str, ...]:
    """Token strings that end an assistant turn: EOS, the generation config's EOS ids, and the template's own.

    The template's own is found by rendering a probe answer and reading the special token written right after it.
    """
    cached = getattr(tokenizer, "lorajobs_end_of_turn", None)
    if cached is not None:
        return cached
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    ids = [tokenizer.eos_token_id, *getattr(tokenizer, "lorajobs_generation_eos_ids", ())]
    found = [tok for tok in tokenizer.convert_ids_to_tokens([i for i in ids if i is not None]) if tok in special]
    if tokenizer.chat_template:
        probe = "lorajobs-probe-answer"
        try:
            text = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}], tokenizer)
        except Exception:  # a template that refuses this probe still gets EOS and the generation config's ids
            text = ""
        after = text[text.find(probe) + len(probe):].lstrip(" ") if probe in text else ""
        found += [tok for tok in sorted(special, key=len, reverse=True) if tok and after.startswith(tok)][:1]
    tokenizer.lorajobs_end_of_turn = tuple(dict.fromkeys(found))
    return tokenizer.lorajobs_end_of_turn


def render_example(example: Example, tokenizer) -> Rendered:
    """Format: the example rendered once, exactly as inference renders it, with the trained character spans.

    A trained span is an assistant turn's content plus the end-of-turn token the template writes after it
    (whitespace between them included); text examples are trained whole.
    """
    if example.kind == "text":
        return Rendered(example.text, [(0, len(example.text))], add_special_tokens=True, append_eos=True)
    text = render_chat(messages_of(example.turns), tokenizer)
    end_tokens = end_of_turn_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    append_eos = False
    assistant_turns = [t for t in example.turns if t.role == "assistant"]
    for k, turn in enumerate(assistant_turns):
        found = _find_content(text, turn.content, cursor)
        if found is None and REASONING_END in turn.content:  # the template dropped this turn's reasoning (Qwen3)
            found = _find_content(text, turn.content.rsplit(REASONING_END, 1)[1], cursor)
        if found is None:
            if turn.trained:
                raise TemplateMismatch(f"the chat template does not render assistant turn {k + 1}'s content verbatim")
            continue  # context the template rewrote beyond recognition: nothing of it is trained
        start, end = found
        cursor = end
        gap = len(text[end:]) - len(text[end:].lstrip(" \t\n"))
        closing = next((tok for tok in end_tokens if text.startswith(tok, end + gap)), None)
        if closing is not None:
            end = cursor = end + gap + len(closing)
        elif k == len(assistant_turns) - 1 and not text[end:].strip():
            text, append_eos = text[:end], turn.trained  # trailing whitespace is never generated; EOS ends the turn
        if turn.trained:
            spans.append((start, end))
    return Rendered(text, spans, add_special_tokens=False, append_eos=append_eos)


def tokenize_example(example: Example, tokenizer, max_seq_length: int, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    """Tokenize: the rendered text tokenized once; a token is trained when its characters touch a trained span.

    Truncated to `max_seq_length`; labels are -100 where not trained.
    """
    rendered = render_example(example, tokenizer)
    encoded = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    spans = iter(rendered.trained)
    span = next(spans, None)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        while span is not None and span[1] <= start:
            span = next(spans, None)
        if span is not None and start < end and start < span[1] and end > span[0]:
            labels[i] = input_ids[i]
    eos = tokenizer.eos_token_id
    if rendered.append_eos and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos)
    if train_on_inputs:
        labels = list(input_ids)
    return input_ids[:max_seq_length], labels[:max_seq_length]


def has_trained_token(labels: list[int]) -> bool:
    """Whether any label carries loss; the first never does (nothing predicts it)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def tokenize_all(examples: list[Example], tokenizer, max_seq_length: int, train_on_inputs: bool) -> TokenizedData:
    """Tokenize every example; drop (and count) those left with no trained token instead of training them all-masked."""
    data = TokenizedData()
    for example in examples:
        full_ids, full_labels = tokenize_example(example, tokenizer, 10**9, train_on_inputs)
        input_ids, labels = full_ids[:max_seq_length], full_labels[:max_seq_length]
        if len(full_ids) > max_seq_length:
            data.truncated += 1
        if not has_trained_token(labels):
            reason = "no trained token after truncation" if has_trained_token(full_labels) else "no trained token"
            data.dropped[reason] = data.dropped.get(reason, 0) + 1
            continue
        data.rows.append({"input_ids": input_ids, "labels": labels})
    return data


def make_collator(packing: bool, tokenizer):
    """Pack: padding-free rows with per-example position ids, or padding to the longest row of the micro batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # Position ids restart per example and the attention mask is derived from them: no cross-example attention
        # as long as the model runs with use_cache=False (load_base_model sets it).
        return DataCollatorWithFlattening(return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


class LabelledLogitsOnly:
    """A training collator's batches, plus what makes the model project only the positions whose next token is trained.

    The vocabulary projection and the cross-entropy are a fifth or more of a small model's compute and its largest
    activation (tokens × vocabulary floats), and most tokens of instruction data are prompt: their logits feed no
    loss. transformers' `logits_to_keep` mask keeps the hidden states of the labelled positions only (flattened, as
    packing needs) and `shift_labels` are their targets, so the loss is the same average over the same tokens.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        import torch

        batch = self.collator(features)
        labels = batch["labels"]
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position i predicts i + 1
        keep = targets != IGNORE_INDEX
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = targets[keep]
        return batch


class PackedBoundaries:
    """A packing collator's batches, plus where each example starts in the packed row (worker/training/attention.py)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        from worker.training.attention import add_boundaries

        return add_boundaries(self.collator(features))


def _forward_parameters(model):
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(type(base).forward).parameters


def with_boundaries(collator, model):
    """`PackedBoundaries` where the model attends per packed example and its forward hands keyword arguments on."""
    import inspect

    from worker.training.attention import PACKED_SDPA

    if getattr(model.config, "_attn_implementation", None) != PACKED_SDPA:
        return collator
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _forward_parameters(model).values()):
        return collator
    return PackedBoundaries(collator)


def training_collator(collator, model):
    """The collator the Trainer trains with: the packed examples' boundaries where the model uses them, and
    `LabelledLogitsOnly` where its forward takes `logits_to_keep`."""
    collator = with_boundaries(collator, model)
    if "logits_to_keep" in _forward_parameters(model):
        return LabelledLogitsOnly(collator)
    return collator
