"""Queries on uploaded files, always scoped by project."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.clock import db_epoch
from db.models import File, Job
from db.repositories.pagination import Page, paginate

ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


def add(session: Session, row: File) -> None:
    session.add(row)
    session.flush()


def get(session: Session, project_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))


def get_any(session: Session, file_id: str) -> File | None:
    """A file by id alone, for the worker that was handed the id."""
    return session.scalar(select(File).where(File.id == file_id))


def page(session: Session, project_id: str, *, purpose: str | None, after: str | None, limit: int,
         order: str) -> Page[File]:
    stmt = select(File).where(File.project_id == project_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return paginate(session, stmt, File, after=after, limit=limit, order=order)


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
