"""Queries on fine-tuning jobs, their events and checkpoints. Ownership checks live in the callers' filters."""

from collections import namedtuple
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import Row, Select, bindparam, delete, select, update
from sqlalchemy.orm import Session

from db.clock import db_epoch
from db.models import Checkpoint, Job, JobEvent
from db.repositories.pagination import Page, paginate, unknown_cursor

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


def add(session: Session, row: Job | JobEvent | Checkpoint) -> None:
    session.add(row)
    session.flush()


def get(session: Session, project_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))


# What a job's API object (api/services/jobs.py `to_object`) shows: these columns, and these keys of `result`. The
# job reads select only them: not the artifacts, leases or idempotency columns, nor the rest of the result (the
# held-out answers, the library versions), whose JSON would be decoded for nothing.
OBJECT_COLUMNS = ("id", "created_at", "error", "fine_tuned_model", "finished_at", "hyperparameters", "spec", "model",
                  "result_files", "seed", "status", "training_file_id", "trained_tokens", "validation_file_id",
                  "estimated_finish", "user_metadata", "suffix", "progress", "baseline_eval_loss", "final_eval_loss",
                  "adapter_sha256", "cancel_requested", "pause_requested", "attempts", "resends", "parameters", "plan",
                  "placement")
OBJECT_RESULT_KEYS = ("chat_template", "served_eval", "quality", "best_checkpoint")


class JobFields(namedtuple("JobFields", (*OBJECT_COLUMNS, "result"))):
    """A job's OBJECT_COLUMNS as attributes, and `result` with only its OBJECT_RESULT_KEYS: read, never changed."""

    __slots__ = ()

    @classmethod
    def of(cls, row: Row) -> "JobFields":
        columns = len(OBJECT_COLUMNS)
        return cls._make((*row[:columns], dict(zip(OBJECT_RESULT_KEYS, row[columns:]))))


# Core statements built once, with bound parameters: no ORM identity map for rows that are only read, and no new
# statement per request (building one of some thirty columns and working out its cache key cost more CPU than
# running it).
_jobs = Job.__table__
_OBJECT_SELECT = select(*(_jobs.c[name] for name in OBJECT_COLUMNS),
                        *(_jobs.c.result[key] for key in OBJECT_RESULT_KEYS))
_OBJECT_OF_PROJECT = _OBJECT_SELECT.where(_jobs.c.id == bindparam("job_id"),
                                          _jobs.c.project_id == bindparam("project_id"))
_SEQ_OF_PROJECT = select(_jobs.c.seq).where(_jobs.c.id == bindparam("job_id"),
                                            _jobs.c.project_id == bindparam("project_id"))


def get_fields(session: Session, project_id: str, job_id: str) -> JobFields | None:
    row = session.execute(_OBJECT_OF_PROJECT, {"job_id": job_id, "project_id": project_id}).first()
    return None if row is None else JobFields.of(row)


@lru_cache(maxsize=64)
def _fields_page_statement(status: bool, after: bool, metadata_keys: tuple[str, ...]) -> Select:
    stmt = _OBJECT_SELECT.where(_jobs.c.project_id == bindparam("project_id"))
    if status:
        stmt = stmt.where(_jobs.c.status == bindparam("status"))
    for i, key in enumerate(metadata_keys):
        stmt = stmt.where(_jobs.c.user_metadata[key].as_string() == bindparam(f"metadata_{i}"))
    if after:
        stmt = stmt.where(_jobs.c.seq < bindparam("cursor"))
    return stmt.order_by(_jobs.c.seq.desc()).limit(bindparam("rows"))


def fields_page(session: Session, project_id: str, *, after: str | None, limit: int, status: str | None = None,
                metadata: dict[str, str] | None = None) -> Page[JobFields]:
    """`page` of JobFields: the same rows, cursor rule and order (db/repositories/pagination.py `paginate`)."""
    params: dict[str, Any] = {"project_id": project_id, "status": status, "rows": limit + 1}
    if after:
        # As `paginate` looks a cursor up: within the project only, so another project's id reads as unknown.
        params["cursor"] = session.execute(_SEQ_OF_PROJECT, {"job_id": after, "project_id": project_id}).scalar()
        if params["cursor"] is None:
            raise unknown_cursor(after)
    keys = tuple(metadata or {})
    params.update({f"metadata_{i}": metadata[key] for i, key in enumerate(keys)})
    rows = session.execute(_fields_page_statement(bool(status), bool(after), keys), params).all()
    return Page([JobFields.of(row) for row in rows[:limit]], len(rows) > limit)


def get_any(session: Session, job_id: str, *, for_update: bool = False) -> Job | None:
    stmt = select(Job).where(Job.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def get_by_idempotency_key(session: Session, project_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key))


def page(session: Session, project_id: str, *, after: str | None, limit: int, status: str | None = None,
         metadata: dict[str, str] | None = None) -> Page[Job]:
    stmt = select(Job).where(Job.project_id == project_id)
    if status:
        stmt = stmt.where(Job.status == status)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.user_metadata[key].as_string() == value)
    return paginate(session, stmt, Job, after=after, limit=limit, scope=Job.project_id == project_id)


def waiting_on_file(session: Session, file_id: str) -> list[Job]:
    stmt = select(Job).where(
        Job.status == "validating_files",
        (Job.training_file_id == file_id) | (Job.validation_file_id == file_id),
    )
    return list(session.scalars(stmt))


def claim(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """queued -> running for exactly one worker; a late or duplicate message matches no row.

    The lease is stamped with the database's clock, the one the sweep compares it with (db/clock.py).
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(status="running", lease_owner=owner, lease_expires_at=db_epoch() + lease_seconds,
                attempts=Job.attempts + 1, started_at=db_epoch())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.lease_owner == owner)
        .values(lease_expires_at=db_epoch() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def update_owned(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    """Update a running job only while `owner` still holds its lease."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def active(session: Session) -> list[Row]:
    """Every project's running jobs, then its queued jobs in the order they were queued (for queue positions).

    Rows of the columns a queue position is worked out from, not jobs: a queued job's read loads every active job,
    and their specs, results and artifacts would be decoded for nothing.
    """
    stmt = (select(Job.id, Job.status, Job.plan, Job.placement, Job.progress, Job.estimated_finish)
            .where(Job.status.in_(("running", "queued"))).order_by((Job.status == "queued"), Job.seq))
    return list(session.execute(stmt))


def _due(deadline):
    """A deadline passed by the database's clock; a row with none is due at once rather than never."""
    return deadline.is_(None) | (deadline < db_epoch())


def expired_leases(session: Session, limit: int) -> list[Job]:
    """Running jobs whose lease ended by the database's clock (or that have none), locked; rows another sweep holds
    are skipped."""
    stmt = (select(Job).where(Job.status == "running", _due(Job.lease_expires_at)).order_by(Job.seq)
            .limit(limit).with_for_update(skip_locked=True))
    return list(session.scalars(stmt))


def stale_queued(session: Session, limit: int) -> list[Job]:
    """Queued jobs whose dispatch deadline passed (their message may have been lost), or whose cancel was asked
    (no claim ever takes them), locked; rows another sweep holds are skipped."""
    stmt = (select(Job).where(Job.status == "queued", _due(Job.lease_expires_at) | Job.cancel_requested.is_(True))
            .order_by(Job.seq).limit(limit).with_for_update(skip_locked=True))
    return list(session.scalars(stmt))


def pending_merges(session: Session, limit: int) -> list[Job]:
    """Succeeded jobs whose merge was asked for and has not finished, locked; rows another sweep holds are skipped."""
    stmt = (select(Job).where(Job.status == "succeeded", Job.artifacts["merged"]["status"].as_string() == "pending")
            .order_by(Job.seq).limit(limit).with_for_update(skip_locked=True))
    return list(session.scalars(stmt))


def events_page(session: Session, job_id: str, *, after: str | None, limit: int,
                order: Literal["asc", "desc"] = "desc") -> Page[JobEvent]:
    return paginate(session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent, after=after, limit=limit,
                    order=order)


def metrics_events(session: Session, job_id: str) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.seq)
    return list(session.scalars(stmt))


def delete_metrics_after(session: Session, job_id: str, step: int) -> int:
    """Drop metrics of steps a resumed run will train again, so no step is counted twice."""
    rows = [e for e in metrics_events(session, job_id) if (e.data or {}).get("step", 0) > step]
    if rows:
        session.execute(delete(JobEvent).where(JobEvent.id.in_([e.id for e in rows])))
    return len(rows)


def checkpoints_page(session: Session, job_id: str, *, after: str | None, limit: int) -> Page[Checkpoint]:
    return paginate(session, select(Checkpoint).where(Checkpoint.job_id == job_id), Checkpoint, after=after,
                    limit=limit)


def checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def get_checkpoint(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id))


def delete_row(session: Session, row: Checkpoint) -> None:
    session.delete(row)
    session.flush()


def fine_tuned(session: Session, project_id: str) -> list[Job]:
    stmt = (select(Job).where(Job.project_id == project_id, Job.status == "succeeded",
                              Job.model_deleted_at.is_(None))
            .order_by(Job.seq.desc()))
    return list(session.scalars(stmt))


def active_of_project(session: Session, project_id: str) -> list[Job]:
    """A project's jobs validating, queued or running (its quotas)."""
    stmt = select(Job).where(Job.project_id == project_id, Job.status.in_(("validating_files", "queued", "running")))
    return list(session.scalars(stmt))


def count_merged(session: Session, project_id: str) -> int:
    """A project's merged models stored or being made, of fine-tuned models not deleted."""
    stmt = select(Job.artifacts).where(Job.project_id == project_id, Job.status == "succeeded",
                                       Job.model_deleted_at.is_(None), Job.artifacts.is_not(None))
    return sum(1 for artifacts in session.scalars(stmt) if (artifacts.get("merged") or {}).get("status")
               in ("pending", "ready"))


def by_fine_tuned_model(session: Session, project_id: str, model: str, *, for_update: bool = False) -> Job | None:
    """The project's succeeded job that produced `model`, unless that model was deleted."""
    stmt = select(Job).where(Job.project_id == project_id, Job.fine_tuned_model == model,
                             Job.status == "succeeded", Job.model_deleted_at.is_(None))
    return session.scalar(stmt.with_for_update() if for_update else stmt)
