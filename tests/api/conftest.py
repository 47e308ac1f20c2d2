"""A project with a job trained for real on the tiny model, for the tests that need finished-job objects."""

import re
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import make_project_key
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status


@dataclass
class Trained:
    key: str
    client: openai.OpenAI
    job: object  # openai's FineTuningJob, succeeded
    file_id: str


def train_one(stack, settings) -> Trained:
    """A fresh project whose one job succeeded (tiny model, a few seconds), with checkpoints and events."""
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=60)
    file_id = processed_file(client, support_dataset(16))
    job = create_job(client, file_id, hyperparameters={"n_epochs": 1, "batch_size": 4})
    finished = wait_status(client, job.id, timeout=180)
    assert finished.status == "succeeded", finished.error
    print(f"trained {job.id}: queued to finished {finished.finished_at - finished.created_at} s")
    return Trained(key, client, finished, file_id)


@pytest.fixture(scope="module")
def trained(stack, settings) -> Trained:
    return train_one(stack, settings)


def dashboard_client(base_url: str, key: str) -> httpx.Client:
    """An httpx client signed in to the dashboard with `key`, as the login form does it."""
    client = httpx.Client(base_url=base_url, timeout=30)
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    signed_in = client.post("/login", data={"api_key": key, "csrf_token": token, "next": "/jobs"})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/jobs", signed_in.text
    return client


def csrf_of(client: httpx.Client, path: str = "/jobs") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)
