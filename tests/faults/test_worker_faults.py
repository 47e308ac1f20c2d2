"""A training worker's faults on real services, each ending with the job in a final state and its true diagnosis:
a missing dataset, a full disk, a hung or stopped training process."""

import os
import signal
import subprocess
import time

from core.storage import get_storage
from tests.e2e.jobs_helpers import wait_status
from tests.faults.workers import FaultStack, messages


def test_a_dataset_gone_from_storage_fails_dataset_missing(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file(12)
        stack.worker("gpu", "missing")
        key = f"projects/{_project_of(stack, training_file)}/files/{training_file}"
        get_storage(stack.settings).delete(key)
        job = stack.job(training_file)
        # 240 s, as for the other jobs: the worker's first claim waits on its start (torch's import), slow on a loaded host
        done = wait_status(stack.client, job.id, timeout=240)
        assert done.status == "failed"
        assert done.error.code == "dataset_missing"
        assert done.error.param == "training_file"
        assert "missing from object storage" in done.error.message


def test_too_little_free_space_is_disk_full_after_an_infrastructure_retry_that_spends_no_attempt(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file(12)
        stack.worker("gpu", "disk-threshold", lorajobs_work_min_free_bytes=str(1 << 60), lorajobs_max_infra_retries="1")
        job = stack.job(training_file)
        done = wait_status(stack.client, job.id, timeout=120)
        assert done.status == "failed"
        assert done.error.code == "disk_full"
        assert "LORAJOBS_WORK_MIN_FREE_BYTES" in done.error.message
        assert done.model_extra["attempts"] == 0  # both tries were the worker's disk, not the job
        text = messages(stack.client, job.id)
        assert any("infrastructure retry 1 of 1; no attempt spent" in m for m in text), text


def test_a_work_folder_that_fills_during_training_is_disk_full(settings, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)], check=True)
    try:
        with FaultStack(settings) as stack:
            training_file = stack.training_file(48)
            stack.worker("gpu", "disk-tmpfs", lorajobs_work_dir=str(folder), lorajobs_work_min_free_bytes="0",
                         lorajobs_max_infra_retries="0")
            # A small adapter (r 2 on q/v): the start-up space check passes and the checkpoints fill the disk mid-run.
            job = stack.job(training_file, save_steps=2, lora={"r": 2, "target_modules": "attention-qv"})
            done = wait_status(stack.client, job.id, timeout=180)
            assert done.status == "failed"
            assert done.error.code == "disk_full"
            assert "disk is full" in done.error.message
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_hung_training_thread_is_abandoned_by_the_watchdog_with_timeout(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file(48)
        worker = stack.worker("gpu", "hang", lorajobs_test_fault_hang_at_step="3", lorajobs_watchdog_seconds="8",
                              lorajobs_max_attempts="1")
        pool_before = worker.pool()
        job = stack.job(training_file)
        done = wait_status(stack.client, job.id, timeout=180)
        assert done.status == "failed"
        assert done.error.code == "timeout"
        assert "No training progress for 8 s" in done.error.message
        assert (done.model_extra.get("progress") or {}).get("step", 0) < 4
        deadline = time.time() + 30  # the hung process ended; the pool started a fresh one
        while time.time() < deadline and set(worker.pool()) & set(pool_before):
            time.sleep(0.2)
        assert not set(worker.pool()) & set(pool_before)


def test_a_stopped_training_process_loses_its_job_and_writes_nothing_when_it_runs_again(settings):
    with FaultStack(settings) as stack:
        training_file = stack.training_file(48)
        worker = stack.worker("gpu", "sigstop")
        job = stack.job(training_file, save_steps=2)
        stack.wait_step(job.id, 3)
        (child,) = worker.pool()
        os.kill(child, signal.SIGSTOP)
        try:
            requeued = wait_status(stack.client, job.id, statuses=("queued",), timeout=60)
            assert requeued.status == "queued"  # its lease ended: the sweep took the job back
            cancelled = stack.client.fine_tuning.jobs.cancel(job.id)
            assert cancelled.status == "cancelled"
            events_then = messages(stack.client, job.id)
            checkpoints_then = [c.id for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)]
        finally:
            os.kill(child, signal.SIGCONT)
        time.sleep(6)  # it runs on, finds its lease gone, and stops
        after = stack.client.fine_tuning.jobs.retrieve(job.id)
        assert after.status == "cancelled"
        assert messages(stack.client, job.id) == events_then
        assert [c.id for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id)] == checkpoints_then
        assert "lease lost" in worker.log_path.read_text()


def _project_of(stack: FaultStack, file_id: str) -> str:
    from db.repositories import files as files_repo
    from db.session import transaction

    with transaction(stack.settings.database_url) as session:
        return files_repo.get_any(session, file_id).project_id
