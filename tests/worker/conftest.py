"""Fixtures of the worker tests: small chat datasets and specs that train in seconds (catalogues: tests/conftest.py)."""

import json
from pathlib import Path

import pytest

from core.spec import JobSpec
from tests.helpers.tiny_model import retail_chat_records

TINY = "tiny/llama"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_spec(**overrides) -> JobSpec:
    """A plain-LoRA spec for the tiny model that trains 5 steps on 20 examples in about a second."""
    fields = dict(model=TINY, quantization="none", n_epochs=1, batch_size=4, learning_rate=1e-2, seed=0,
                  lora={"r": 8, "dropout": 0.1, "target_modules": "attention-qv"}, max_seq_length=128)
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    """Training (20 chats) and validation (6 chats) files."""
    root = tmp_path_factory.mktemp("chat")
    return (write_jsonl(root / "train.jsonl", retail_chat_records(20)),
            write_jsonl(root / "valid.jsonl", retail_chat_records(6, offset=50)))


@pytest.fixture(scope="session")
def tokenizer(models_dir):
    from worker.training import load_tokenizer

    return load_tokenizer(TINY, models_dir)
