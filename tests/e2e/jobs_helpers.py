"""Shared steps of the end-to-end job tests: datasets for the tiny model, waiting on jobs."""

import io
import json
import random
import time

import openai

from tests.conftest import TINY_MODEL_ID

PRODUCTS = ["tent", "kettle", "lamp", "boots", "jacket", "stove", "backpack", "bottle"]
TERMINAL = ("succeeded", "failed", "cancelled")


def support_dataset(n: int, seed: int = 0) -> bytes:
    """Chat examples the tiny model can learn: a fixed answer pattern per product."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        product = PRODUCTS[i % len(PRODUCTS)]
        price = 10 + PRODUCTS.index(product) * 7
        rows.append({"messages": [
            {"role": "system", "content": "You are the store's support assistant."},
            {"role": "user", "content": rng.choice(["What is the price of the", "How much is the"]) + f" {product}?"},
            {"role": "assistant", "content": f"The {product} costs {price} euros."},
        ]})
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def processed_file(client: openai.OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    uploaded = client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")
    result = client.files.wait_for_processing(uploaded.id, poll_interval=0.2, max_wait_seconds=60)
    assert result.status == "processed", result.status_details
    return result.id


def create_job(client: openai.OpenAI, training_file: str, **extra):
    method_hyper = extra.pop("hyperparameters", {"n_epochs": 2, "batch_size": 4})
    # No early stopping unless a test asks: a tiny random model's held-out loss moves by less than the threshold,
    # so a job meant to be still running when the test looks would end after a few evaluations.
    body = {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, "eval_steps": 2, "save_steps": 2,
            "early_stopping_patience": None}
    body.update(extra)
    return client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=training_file, suffix="e2e",
        method={"type": "supervised", "supervised": {"hyperparameters": method_hyper}}, extra_body=body)


def wait_status(client: openai.OpenAI, job_id: str, statuses=TERMINAL, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is still {job.status} after {timeout} s")


def all_events(client: openai.OpenAI, job_id: str) -> list:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))
