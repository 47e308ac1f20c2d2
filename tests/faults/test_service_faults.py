"""The database and object storage fail under a training job: a PostgreSQL restart costs the job nothing, a database
away longer than the lease leaves exactly one owner, and storage outages are retried as infrastructure."""

import time

from core.storage import get_storage
from db.migrate import upgrade
from db.repositories import jobs as repo
from db.session import transaction
from tests.e2e.jobs_helpers import all_events, wait_status
from tests.faults.restartable import Postgres, SeaweedFS
from tests.faults.workers import FaultStack, messages


def _trained_steps(client, job_id: str) -> list[int]:
    return [e.data["step"] for e in all_events(client, job_id) if e.type == "metrics" and "train_loss" in (e.data or {})]


def test_postgresql_restarted_mid_training_the_job_succeeds_without_spending_an_attempt(settings):
    pg = Postgres().init()
    try:
        upgrade(pg.url)
        with FaultStack(settings.model_copy(update={"database_url": pg.url})) as stack:
            training_file = stack.training_file(48)
            stack.worker("gpu", "pg-restart")
            job = stack.job(training_file, hyperparameters={"n_epochs": 3, "batch_size": 2}, save_steps=10)
            stack.wait_step(job.id, 3)
            pg.restart()
            done = wait_status(stack.client, job.id, timeout=240)
            assert done.status == "succeeded", done.error
            assert done.model_extra["attempts"] == 1
            text = messages(stack.client, job.id)
            assert not any("worker was lost" in m or "retrying" in m for m in text), text
            total = done.model_extra["progress"]["total_steps"]
            assert sorted(_trained_steps(stack.client, job.id)) == list(range(1, total + 1))  # none lost, none twice
    finally:
        pg.remove()


def test_postgresql_down_longer_than_the_lease_leaves_exactly_one_owner(settings):
    pg = Postgres().init()
    try:
        upgrade(pg.url)
        with FaultStack(settings.model_copy(update={"database_url": pg.url})) as stack:
            training_file = stack.training_file(48)
            stack.worker("gpu", "pg-down-1")
            stack.worker("gpu", "pg-down-2")
            job = stack.job(training_file, hyperparameters={"n_epochs": 4, "batch_size": 2}, save_steps=5)
            stack.wait_step(job.id, 6)
            pg.stop()
            time.sleep(stack.settings.lease_seconds + 4)
            pg.start()
            done = wait_status(stack.client, job.id, timeout=300)
            assert done.status == "succeeded", done.error
            text = messages(stack.client, job.id)
            assert text.count("The job has successfully completed") == 1
            steps = _trained_steps(stack.client, job.id)
            assert sorted(steps) == list(range(1, done.model_extra["progress"]["total_steps"] + 1))
            with transaction(pg.url) as session:
                row = repo.get_any(session, job.id)
                # The owner that finished wrote under its own attempt; every checkpoint row is an owner's.
                assert f"/attempt-{row.attempts}/" in row.artifacts["tar.gz"]["key"]
                for checkpoint in repo.checkpoints(session, job.id):
                    assert any(f"/attempt-{n}/" in checkpoint.storage_key for n in range(1, row.attempts + 1))
            if done.model_extra["attempts"] == 2:
                assert any("worker was lost" in m for m in text)
            print(f"attempts: {done.model_extra['attempts']}")
    finally:
        pg.remove()


def _s3_stack(settings, s3: SeaweedFS):
    mine = settings.model_copy(update={"s3_endpoint_url": s3.endpoint, "storage_url": "s3://faults/data"})
    get_storage(mine).ensure_bucket()
    return FaultStack(mine)


def _wait_checkpoint(stack: FaultStack, job_id: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list(stack.client.fine_tuning.jobs.checkpoints.list(job_id)):
        time.sleep(0.1)


def test_s3_stopped_during_checkpoints_the_final_upload_and_the_resume_download(settings):
    s3 = SeaweedFS().start()
    try:
        with _s3_stack(settings, s3) as stack:
            training_file = stack.training_file(48)
            stack.worker("gpu", "s3", lorajobs_write_retry_seconds="2")
            job = stack.job(training_file, hyperparameters={"n_epochs": 2, "batch_size": 2}, save_steps=20)
            _wait_checkpoint(stack, job.id)
            s3.stop()
            # Checkpoint 40 and the final adapter cannot be stored: requeued as infrastructure, no attempt spent.
            requeued = wait_status(stack.client, job.id, statuses=("queued",), timeout=180)
            assert requeued.model_extra["attempts"] == 0
            # Sent again while storage is still away: the resumed attempt's downloads fail the same way.
            deadline = time.time() + 180
            while time.time() < deadline and not any("infrastructure retry 2" in m for m in messages(stack.client, job.id)):
                time.sleep(0.5)
            s3.start()
            done = wait_status(stack.client, job.id, timeout=240)
            assert done.status == "succeeded", done.error
            assert done.model_extra["attempts"] == 1
            text = messages(stack.client, job.id)
            assert any(m.startswith("Checkpoint at step 40 could not be stored") for m in text), text
            assert any("while uploading the final adapter" in m and "infrastructure retry 1 of 5" in m for m in text)
            assert any("while downloading the training file" in m and "infrastructure retry 2" in m for m in text)
            assert "Resuming from checkpoint step 20 (attempt 1)" in text
    finally:
        s3.remove()


def test_a_cancel_whose_checkpoint_cannot_be_stored_still_cancels(settings):
    s3 = SeaweedFS().start()
    try:
        with _s3_stack(settings, s3) as stack:
            training_file = stack.training_file(48)
            stack.worker("gpu", "s3-cancel")
            job = stack.job(training_file)
            stack.wait_step(job.id, 3)
            s3.stop()
            stack.client.fine_tuning.jobs.cancel(job.id)
            done = wait_status(stack.client, job.id, timeout=180)
            assert done.status == "cancelled"
            text = messages(stack.client, job.id)
            assert any(m.startswith("Checkpoint at step") and "could not be stored" in m for m in text), text
    finally:
        s3.remove()
