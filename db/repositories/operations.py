"""Queries for operators (`/metrics`, `/readyz`): jobs counted by status and queue, waits, finished jobs' timings."""

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.queue import GPU_QUEUE
from db.models import Job


def _queue():
    """A job's training queue (db/lifecycle.py `training_queue`) as SQL: its placement's, else `gpu`."""
    return func.coalesce(Job.placement["queue"].as_string(), GPU_QUEUE)


def jobs_by_status_and_queue(session: Session) -> dict[tuple[str, str], int]:
    queue = _queue()
    rows = session.execute(select(Job.status, queue, func.count()).group_by(Job.status, queue))
    return {(status, name): count for status, name, count in rows}


def queued_by_queue(session: Session) -> dict[str, tuple[int, float]]:
    """For each queue with queued jobs: (how many, when the oldest was created)."""
    queue = _queue()
    rows = session.execute(select(queue, func.count(), func.min(Job.created_at))
                           .where(Job.status == "queued").group_by(queue))
    return {name: (count, oldest) for name, count, oldest in rows}


@dataclass(frozen=True)
class FinishedJob:
    status: str
    queue: str
    seconds: float
    steps: int | None


def finished_jobs(session: Session) -> list[FinishedJob]:
    """Every job that ran and finished, with its run time (from its claim to its end) and optimizer steps."""
    rows = session.execute(select(Job.status, _queue(), Job.finished_at - Job.started_at, Job.progress)
                           .where(Job.finished_at.is_not(None), Job.started_at.is_not(None)))
    return [FinishedJob(status, queue, max(0.0, seconds), (progress or {}).get("step") or None)
            for status, queue, seconds, progress in rows]


def trained_tokens_by_queue(session: Session) -> dict[str, int]:
    queue = _queue()
    rows = session.execute(select(queue, func.sum(Job.trained_tokens)).where(Job.trained_tokens.is_not(None))
                           .group_by(queue))
    return {name: int(total or 0) for name, total in rows}
