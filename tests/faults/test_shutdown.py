"""Deploys and pauses lose no work: SIGTERM to a training worker and `jobs.pause` both stop at the next step with a
checkpoint and release the job without spending an attempt; a new worker (or `jobs.resume`) carries on from it."""

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil

from cli.service import STOP_GRACE_SECONDS
from db.repositories import jobs as repo
from db.session import transaction
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status
from tests.faults.workers import FaultStack, messages
from tests.stack import ROOT, free_port, settings_env
from worker.catalogue import SMOLLM2_ID

# docs/operations.md: a worker given SIGTERM exits within one training step, a checkpoint upload and its own start-up
# costs; on these shared 2-core machines that is seconds.
SIGTERM_EXIT_BOUND_S = 60


def test_sigterm_mid_training_checkpoints_and_requeues_without_spending_an_attempt(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file()
        first = stack.worker("gpu", "sigterm-1")
        job = stack.job(training_file)
        stack.wait_step(job.id, 3)

        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
        first.proc.wait(timeout=SIGTERM_EXIT_BOUND_S)
        took = time.monotonic() - started

        released = stack.client.fine_tuning.jobs.retrieve(job.id)
        assert released.status == "queued", (released.status, released.error)
        assert released.model_extra["attempts"] == 0
        saved = [c.step_number for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert len(saved) == 1 and saved[0] >= 3, saved  # save_steps=100: this is the shutdown's checkpoint
        text = messages(stack.client, job.id)
        assert any(m.startswith(f"The worker is shutting down: job released at step {saved[0]}") for m in text), text
        print(f"worker exited {took:.1f} s after SIGTERM, job released at step {saved[0]}")

        stack.worker("gpu", "sigterm-2")
        done = wait_status(stack.client, job.id, timeout=240)
        assert done.status == "succeeded", done.error
        assert done.model_extra["attempts"] == 1
        text = messages(stack.client, job.id)
        assert f"Resuming from checkpoint step {saved[0]} (attempt 1)" in text
        assert not any("worker was lost" in m for m in text)


def test_pause_stops_at_a_checkpoint_and_resume_carries_on_through_the_sdk(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file()
        stack.worker("gpu", "pause")
        job = stack.job(training_file)
        stack.wait_step(job.id, 3)

        asked = stack.client.fine_tuning.jobs.pause(job.id)
        assert asked.status == "running"  # the worker stops at its next step
        paused = wait_status(stack.client, job.id, statuses=("paused",), timeout=60)
        assert paused.model_extra["attempts"] == 0
        saved = [c.step_number for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert len(saved) == 1, saved
        time.sleep(2 * settings.sweep_interval_seconds + 1)  # the sweep leaves a paused job alone
        assert stack.client.fine_tuning.jobs.retrieve(job.id).status == "paused"

        resumed = stack.client.fine_tuning.jobs.resume(job.id)
        assert resumed.status == "queued"
        done = wait_status(stack.client, job.id, timeout=240)
        assert done.status == "succeeded", done.error
        assert done.model_extra["attempts"] == 1
        text = messages(stack.client, job.id)
        assert any(m.startswith(f"Job paused at step {saved[0]}") for m in text), text
        assert f"Resuming from checkpoint step {saved[0]} (attempt 1)" in text


def test_pause_and_resume_refuse_what_they_cannot_do(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file(12)
        job = stack.job(training_file)  # no GPU worker: it stays queued
        paused = stack.client.fine_tuning.jobs.pause(job.id)
        assert paused.status == "paused"
        again = stack.client.fine_tuning.jobs.pause(job.id)
        assert again.status == "paused"
        stack.client.fine_tuning.jobs.cancel(job.id)
        try:
            stack.client.fine_tuning.jobs.resume(job.id)
        except openai.ConflictError as exc:
            assert exc.body["code"] == "job_not_paused"
        else:
            raise AssertionError("a cancelled job was resumed")
        try:
            stack.client.fine_tuning.jobs.pause(job.id)
        except openai.ConflictError as exc:
            assert exc.body["code"] == "job_not_pausable"
        else:
            raise AssertionError("a cancelled job was paused")


def test_ctrl_c_of_lorajobs_up_mid_training_releases_the_job_and_leaves_no_process(settings, smollm2_models_dir,
                                                                                   tmp_path):
    catalogue = tmp_path / "models"  # the SmolLM2 `up` insists on, and the tiny model the job trains
    for model_id, source in ((SMOLLM2_ID, smollm2_models_dir / SMOLLM2_ID), (TINY_MODEL_ID, settings.models_dir / TINY_MODEL_ID)):
        (catalogue / model_id).parent.mkdir(parents=True, exist_ok=True)
        (catalogue / model_id).symlink_to(source)
    port = free_port()
    mine = FaultStack(settings).settings.model_copy(update={"models_dir": catalogue})
    env = {**os.environ, **settings_env(mine), "LORAJOBS_PORT": str(port), "LORAJOBS_HOST": "127.0.0.1"}
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=make_project_key(mine).key,
                               max_retries=2, timeout=30)
        job = create_job(client, processed_file(client, support_dataset(48)),
                         hyperparameters={"n_epochs": 6, "batch_size": 2}, save_steps=100, eval_steps=100)
        deadline = time.time() + 180
        while time.time() < deadline:
            row = client.fine_tuning.jobs.retrieve(job.id)
            if row.status == "running" and (row.model_extra.get("progress") or {}).get("step", 0) >= 2:
                break
            time.sleep(0.1)
        started = psutil.Process(up.pid).children(recursive=True)
        assert len(started) >= 6  # api, two workers with a pool process each, the sweeper

        began = time.monotonic()
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the foreground group: `up` alone
        up.wait(timeout=STOP_GRACE_SECONDS + 30)
        took = time.monotonic() - began
        time.sleep(0.5)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [(p.pid, p.cmdline()) for p in left]
        print(f"lorajobs up stopped {len(started)} processes in {took:.1f} s")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()

    with transaction(mine.database_url) as session:
        row = repo.get_any(session, job.id)
        assert (row.status, row.attempts) == ("queued", 0)
        assert any(m.message.startswith("The worker is shutting down") for m in repo.events_page(
            session, job.id, after=None, limit=100).items)
        row.status, row.cancel_requested = "cancelled", True  # no sweeper of a later test trains it


def test_a_job_paused_after_its_best_checkpoint_cools_from_it_and_delivers_it_once_resumed(settings):
    from tests.e2e.test_quality import drifting_dataset

    with FaultStack(settings) as stack:
        # Held-out loss is lowest at the first checkpoints and then rises (answers of one repeated word), so the best
        # is behind the pause; the resumed attempt runs in a new work folder, which holds only what it downloads.
        training = processed_file(stack.client, drifting_dataset(64))
        validation = processed_file(stack.client, support_dataset(10, seed=1), name="valid.jsonl")
        stack.worker("gpu", "paused-best")
        job = create_job(stack.client, training, validation_file=validation,
                         hyperparameters={"n_epochs": 4, "batch_size": 4}, learning_rate=0.03, seed=3,
                         early_stopping_patience=5, answer_samples=0, general_replay=0)  # the drift alone
        stack.wait_step(job.id, 5)
        stack.client.fine_tuning.jobs.pause(job.id)
        paused = wait_status(stack.client, job.id, statuses=("paused",), timeout=60)
        paused_at = paused.model_extra["progress"]["step"]  # the step it stopped on, not the last snapshot before
        assert any(m.startswith(f"Job paused at step {paused_at};") for m in messages(stack.client, job.id))
        losses = {c.step_number: c.metrics.valid_loss for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)
                  if c.metrics.valid_loss is not None}  # the pause's own checkpoint is not evaluated
        best = min(losses, key=losses.get)
        assert best < paused_at, losses

        stack.client.fine_tuning.jobs.resume(job.id)
        done = wait_status(stack.client, job.id, timeout=240)
        assert done.status == "succeeded", done.error
        delivered = done.model_extra["delivered_checkpoint"]
        # Patience ran out after the resume, and the cooldown started from the best weights so far, fetched from
        # storage (here the cooled weights then did better still, and are delivered as the best).
        after = {c.step_number: c.metrics.valid_loss for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)}
        assert delivered["early_stopped"] and delivered["cooled_from"] == best, (delivered, losses, after, paused_at)
        assert delivered["value"] <= losses[best]
        text = messages(stack.client, job.id)
        assert any(f"from the weights of step {best} (the best before it)" in m for m in text), text
        assert not any("is not on this worker" in m for m in text)
