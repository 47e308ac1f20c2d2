"""Celery tasks: thin wrappers that receive an id and call the plain functions that do the work."""

import os
import signal

from celery import shared_task
from celery.signals import worker_shutting_down

from core import queue
from worker.resilience import pool_children


@worker_shutting_down.connect
def _tell_pool_processes(**_) -> None:
    """SIGTERM or Ctrl-C reached the main process only (`docker stop`, a terminal): pass it on to the pool, whose
    training then releases its job (an idle one ends); the main process waits for the tasks to end (a warm shutdown)."""
    for pid in pool_children():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


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
