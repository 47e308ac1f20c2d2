"""Deploys and pauses lose no work: SIGTERM to a training worker and `jobs.pause` both stop at the next step with a
checkpoint and release the job without spending an attempt; a new worker (or `jobs.resume`) carries on from it."""

import signal
import time

from tests.e2e.jobs_helpers import wait_status
from tests.faults.workers import FaultStack, messages

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
    import openai

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
