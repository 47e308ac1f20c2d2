"""Data to tokens: loading, formatting with the chat template, labels, truncation, dropping, packing."""

import json

import pytest

from core.datasets.formats import Example, Turn
from tests.worker.conftest import TINY, write_jsonl
from worker.training import tokenize_example
from worker.training.data import (
    IGNORE_INDEX,
    make_collator,
    read_examples,
    render_example,
    split_validation,
    tokenize_all,
)

CHAT = Example("chat", (
    Turn("system", "You are the shop's assistant.", False),
    Turn("user", "Where is my order?", False),
    Turn("assistant", "It ships today.", False),  # weight 0: context only
    Turn("user", "And the refund?", False),
    Turn("assistant", "It is paid in 5 days.", True),
))


def trained_text(ids, labels, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_every_format_loads_skipping_blank_lines_and_a_bom(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "2+2?", "completion": "4"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"text": "Plain text."},
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(("\ufeff" + "\n".join(json.dumps(r) for r in records) + "\n\n  \n").encode())
    examples = read_examples(path)
    assert [e.kind for e in examples] == ["chat", "chat", "chat", "text"]
    assert examples[2].turns[0].content == "Translate\n\nchat"


def test_validation_split_is_seeded_and_disjoint():
    examples = [Example("text", text=str(i)) for i in range(20)]
    train, valid = split_validation(examples, 0.1, seed=3)
    assert len(valid) == 2 and len(train) == 18
    assert {e.text for e in train}.isdisjoint(e.text for e in valid)
    assert split_validation(examples, 0.1, seed=3) == (train, valid)
    assert split_validation(examples, 0.0, seed=3) == (examples, [])


def messages(example: Example) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in example.turns]


def test_render_is_the_whole_conversation_in_the_models_template_with_trained_spans(tokenizer):
    rendered = render_example(CHAT, tokenizer)
    assert rendered.text == tokenizer.apply_chat_template(messages(CHAT), tokenize=False)
    assert [rendered.text[a:b] for a, b in rendered.trained] == ["It is paid in 5 days.<|im_end|>"]
    assert not rendered.append_eos and not rendered.add_special_tokens


def test_labels_train_only_the_assistant_answer_and_its_end_of_turn(tokenizer):
    ids, labels = tokenize_example(CHAT, tokenizer, max_seq_length=512, train_on_inputs=False)
    assert len(ids) == len(labels)
    assert ids == tokenizer.apply_chat_template(messages(CHAT), tokenize=True)["input_ids"]
    assert trained_text(ids, labels, tokenizer) == "It is paid in 5 days.<|im_end|>"
    assert labels[ids.index(tokenizer.eos_token_id)] == IGNORE_INDEX  # the system turn's EOS is context
    assert ids[-1] == tokenizer.convert_tokens_to_ids("Ċ") and labels[-1] == IGNORE_INDEX


def test_train_on_inputs_trains_every_token(tokenizer):
    ids, labels = tokenize_example(CHAT, tokenizer, max_seq_length=512, train_on_inputs=True)
    assert labels == ids


def test_text_examples_are_trained_whole_and_end_with_eos(tokenizer):
    ids, labels = tokenize_example(Example("text", text="Thank you for your order."), tokenizer, 512, False)
    assert labels == ids and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "Thank you for your order.<|im_end|>"


def test_truncation_and_examples_left_without_a_trained_token(tokenizer):
    long_prompt = Example("chat", (Turn("user", "order " * 200, False), Turn("assistant", "Yes.", True)))
    untrained = Example("chat", (Turn("user", "hi", False), Turn("assistant", "hello", False)))
    ids, labels = tokenize_example(long_prompt, tokenizer, max_seq_length=64, train_on_inputs=False)
    assert len(ids) == 64 and set(labels) == {IGNORE_INDEX}
    assert len(tokenize_example(CHAT, tokenizer, 512, False)[0]) < 128
    data = tokenize_all([long_prompt, untrained, CHAT], tokenizer, max_seq_length=128, train_on_inputs=False)
    assert len(data.rows) == 1 and data.truncated == 1
    assert data.dropped == {"no trained token after truncation": 1, "no trained token": 1}


def test_packed_and_padded_batches_give_the_same_loss(models_dir, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_model import retail_chat_records

    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", retail_chat_records(4)))
    rows = tokenize_all(examples, tokenizer, 512, False).rows
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding really happens
    model = AutoModelForCausalLM.from_pretrained(models_dir / TINY, dtype=torch.float32)
    model.config.use_cache = False
    packed, padded = make_collator(True, tokenizer)(rows), make_collator(False, tokenizer)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)
