"""Queries on projects and their API keys."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiKey, Project


def get_project_by_name(session: Session, name: str) -> Project | None:
    return session.scalar(select(Project).where(Project.name == name))


def get_project(session: Session, project_id: str) -> Project | None:
    return session.scalar(select(Project).where(Project.id == project_id))


def add(session: Session, row: Project | ApiKey) -> None:
    session.add(row)
    session.flush()


def get_active_key_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))


def get_project_by_active_key_hash(session: Session, key_hash: str) -> Project | None:
    """The project of an active key, in one query (every API request asks it)."""
    stmt = (select(Project).join(ApiKey, ApiKey.project_id == Project.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    return session.scalar(stmt)


def list_keys(session: Session, project_id: str | None = None) -> list[tuple[ApiKey, Project]]:
    stmt = select(ApiKey, Project).join(Project, Project.id == ApiKey.project_id).order_by(ApiKey.seq)
    if project_id:
        stmt = stmt.where(ApiKey.project_id == project_id)
    return [(key, project) for key, project in session.execute(stmt)]
