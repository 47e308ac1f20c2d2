"""Data to tokens: load JSONL, format with the chat template, tokenize with labels, split, pack."""

import json
import random
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


def _messages(turns) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]


def format_example(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """Format: the example as text segments in the model's own chat template, each marked trained or not.

    A chat is rendered prefix by prefix, so each turn's text is exactly what the template adds for it;
    an assistant turn splits into its header (not trained) and its body (trained when the turn is).
    """
    if example.kind == "text":
        return [(example.text, True)]
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for k, turn in enumerate(example.turns):
        if turn.role == "assistant":
            with_header = tokenizer.apply_chat_template(
                _messages(example.turns[:k]), tokenize=False, add_generation_prompt=True
            )
            segments.append((with_header[len(rendered):], False))
            rendered = with_header
        full = tokenizer.apply_chat_template(_messages(example.turns[: k + 1]), tokenize=False)
        if not full.startswith(rendered):
            raise ValueError("the chat template renders a conversation's prefix differently from the conversation")
        segments.append((full[len(rendered):], turn.trained))
        rendered = full
    return segments


def _segment_ids(text: str, trained: bool, tokenizer) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not trained:
        return ids, [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    if eos not in ids:
        ids = ids + [eos]  # the model must learn to stop; some tokenizers (SmolLM2's) never add EOS
    end = ids.index(eos) + 1
    # Tokens after the turn's EOS (the template's newline) are never generated, so they carry no loss.
    return ids, ids[:end] + [IGNORE_INDEX] * (len(ids) - end)


def tokenize_example(example: Example, tokenizer, max_seq_length: int, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    """Tokenize: input ids and labels (-100 where not trained), truncated to `max_seq_length`."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in format_example(example, tokenizer):
        ids, seg_labels = _segment_ids(text, trained, tokenizer)
        input_ids += ids
        labels += ids if train_on_inputs else seg_labels
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
