"""Celery tasks: thin wrappers that receive an id and call the plain functions that do the work."""

from celery import shared_task

from core import queue


@shared_task(name=queue.PING)
def ping(marker: str) -> str:
    """Round-trip check used by tests and `lorajobs` diagnostics."""
    return marker


@shared_task(name=queue.VALIDATE_FILE)
def validate_file(file_id: str) -> None:
    from worker.datasets import validate_file as run

    run(file_id)


@shared_task(name=queue.TRAIN_JOB)
def train_job(job_id: str) -> None:
    from worker.jobs import run_job

    run_job(job_id)


@shared_task(name=queue.MERGE_JOB)
def merge_job(job_id: str) -> None:
    from worker.merge import merge_job as run

    run(job_id)


@shared_task(name=queue.SWEEP)
def sweep() -> None:
    from worker.sweep import sweep as run

    run()
