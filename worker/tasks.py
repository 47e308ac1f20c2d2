"""Celery tasks: thin wrappers that receive an id and call the plain functions that do the work."""

import os
import signal

from celery import shared_task
from celery.signals import worker_shutting_down

from core import queue
from worker.resilience import pool_children


@worker_shutting_down.connect
def _tell_pool_processes(**_) -> None:
    """SIGTERM or Ctrl-C reached the main process only (`docker stop`, a terminal): pass it on to the pool processes
    that run a task, whose training then releases its job; the main process waits for the tasks to end (a warm
    shutdown) and then stops the idle ones itself."""
    for pid in busy_pool_processes():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


def busy_pool_processes() -> list[int]:
    """The pool processes running a task; all of them while a task is reserved but no process has accepted it yet.

    An idle one is left alone: SIGTERM ended it at once, and billiard's pool then hung in its warm shutdown (the
    main process blocked for good writing the stop sentinels to the pool's queue, until `lorajobs up` killed it
    after 90 s), seen right after a job had trained."""
    from celery.worker import state

    children = pool_children()
    accepted = list(state.active_requests)
    if any(r.worker_pid is None for r in accepted) or set(state.reserved_requests) - set(accepted):
        return children
    running = {r.worker_pid for r in accepted}
    return [pid for pid in children if pid in running]


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
