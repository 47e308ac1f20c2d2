"""Killing the worker outright mid-training: the sweep requeues the job and a new worker resumes it."""

import subprocess
import sys
import time

import openai
import pytest

from tests.conftest import TEST_OUTPUT, make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status
from tests.stack import ROOT, ApiServer, WorkerProcess, settings_env


@pytest.fixture
def own_stack(settings):
    """A broker namespace of its own, so only the workers of this test see its tasks."""
    import os

    mine = settings.model_copy(update={"broker_prefix": settings.broker_prefix + "crash:"})
    api = ApiServer(mine).start()
    sweeper = subprocess.Popen([sys.executable, "-m", "cli.main", "sweeper"], cwd=ROOT,
                               env={**os.environ, **settings_env(mine), "LORAJOBS_SWEEP_INTERVAL_SECONDS": "0.5"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = TEST_OUTPUT / "logs"
    cpu = WorkerProcess(mine, "cpu", logs / "crash-worker-cpu.log").start()
    yield mine, api
    sweeper.terminate()
    sweeper.wait(timeout=10)
    cpu.stop()
    api.stop()


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(own_stack):
    settings, api = own_stack
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key.key, max_retries=0)
    training_file = processed_file(client, support_dataset(48))
    logs = TEST_OUTPUT / "logs"
    first = WorkerProcess(settings, "gpu", logs / "crash-worker-gpu-1.log").start()
    job = create_job(client, training_file, hyperparameters={"n_epochs": 6, "batch_size": 2}, save_steps=10,
                     eval_steps=50)
    deadline = time.time() + 120
    while time.time() < deadline and not list(client.fine_tuning.jobs.checkpoints.list(job.id)):
        time.sleep(0.05)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    first.kill_hard()
    saved_steps = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)}

    requeued = wait_status(client, job.id, statuses=("queued",), timeout=60)
    assert requeued.status == "queued"
    second = WorkerProcess(settings, "gpu", logs / "crash-worker-gpu-2.log").start()
    try:
        done = wait_status(client, job.id, timeout=240)
    finally:
        second.stop()
    assert done.status == "succeeded", done.error
    events = all_events(client, job.id)
    messages = [e.message for e in events]
    assert any("worker was lost" in m and e.level == "warn" for m, e in zip(messages, events))
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint step")]
    assert len(resumed) == 1
    assert int(resumed[0].split()[4]) == max(saved_steps)
    assert messages.count("The job has successfully completed") == 1
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(steps) == len(set(steps)), "a step was recorded twice"
    assert done.model_extra["attempts"] == 2
    assert done.model_extra["progress"]["step"] == done.model_extra["progress"]["total_steps"]
