"""Queries on uploaded files, always scoped by project."""

import time

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from db.clock import db_epoch
from db.models import File, Job
from db.repositories.pagination import Page, paginate

ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


def add(session: Session, row: File) -> None:
    session.add(row)
    session.flush()


def visible(now: float | None = None) -> ColumnElement[bool]:
    """Files neither deleted nor past their `expires_at`: what users see and what counts against quotas."""
    now = time.time() if now is None else now
    return File.deleted_at.is_(None) & (File.expires_at.is_(None) | (File.expires_at > now))


def get(session: Session, project_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.project_id == project_id, visible()))


def get_any(session: Session, file_id: str) -> File | None:
    """A file by id alone, for the worker that was handed the id."""
    return session.scalar(select(File).where(File.id == file_id))


def page(session: Session, project_id: str, *, purpose: str | None, after: str | None, limit: int,
         order: str) -> Page[File]:
    stmt = select(File).where(File.project_id == project_id, visible())
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return paginate(session, stmt, File, after=after, limit=limit, order=order,
                    scope=(File.project_id == project_id) & visible())


def usage(session: Session, project_id: str) -> tuple[int, int]:
    """(files, bytes) a project holds, for its quotas."""
    count, total = session.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))
                                   .where(File.project_id == project_id, visible())).one()
    return count, int(total)


def expired(session: Session, limit: int, project_id: str | None = None) -> list[File]:
    """Files past their `expires_at` whose bytes are still stored, oldest first, locked (skipping held rows)."""
    stmt = select(File).where(File.deleted_at.is_(None), File.expires_at <= time.time())
    if project_id:
        stmt = stmt.where(File.project_id == project_id)
    return list(session.scalars(stmt.order_by(File.expires_at).limit(limit).with_for_update(skip_locked=True)))


def count_jobs_using(session: Session, file_id: str) -> int:
    """Jobs of any state that name the file: their history keeps its id."""
    stmt = select(func.count()).select_from(Job).where(
        (Job.training_file_id == file_id) | (Job.validation_file_id == file_id))
    return session.scalar(stmt) or 0


def stale_validations(session: Session, first_after: float, limit: int) -> list[File]:
    """Files still `uploaded` past their resend deadline (first `first_after` seconds after upload), locked;
    rows another sweep holds are skipped."""
    deadline = func.coalesce(File.resend_at, File.created_at + first_after)
    stmt = (select(File).where(File.status == "uploaded", deadline < db_epoch()).order_by(File.seq).limit(limit)
            .with_for_update(skip_locked=True))
    return list(session.scalars(stmt))


def count_active_jobs_using(session: Session, file_id: str) -> int:
    stmt = select(func.count()).select_from(Job).where(
        Job.status.in_(ACTIVE_JOB_STATUSES),
        (Job.training_file_id == file_id) | (Job.validation_file_id == file_id),
    )
    return session.scalar(stmt) or 0


def delete(session: Session, row: File) -> None:
    session.delete(row)
    session.flush()
