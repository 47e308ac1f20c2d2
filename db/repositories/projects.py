"""Queries on projects, their API keys and the dashboard sessions signed in with them."""

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from db.models import ApiKey, DashboardSession, Project


def get_project_by_name(session: Session, name: str) -> Project | None:
    return session.scalar(select(Project).where(Project.name == name))


def get_project(session: Session, project_id: str) -> Project | None:
    return session.scalar(select(Project).where(Project.id == project_id))


def add(session: Session, row: Project | ApiKey | DashboardSession) -> None:
    session.add(row)
    session.flush()


def _hash_matches(hashes: dict[str, str]):
    """A key row whose hash under its own scheme is one of `hashes` ({scheme: hash})."""
    return or_(*(and_(ApiKey.hash_scheme == scheme, ApiKey.key_hash == value) for scheme, value in hashes.items()))


def get_key_by_hashes(session: Session, hashes: dict[str, str]) -> ApiKey | None:
    """The key row, active or revoked, with one of these hashes."""
    return session.scalar(select(ApiKey).where(_hash_matches(hashes)))


def get_active_key_and_project(session: Session, hashes: dict[str, str]) -> tuple[ApiKey, Project] | None:
    """The active key with one of these hashes and its project, in one query (every API request asks it)."""
    stmt = (select(ApiKey, Project).join(Project, ApiKey.project_id == Project.id)
            .where(_hash_matches(hashes), ApiKey.revoked_at.is_(None)))
    row = session.execute(stmt).first()
    return (row[0], row[1]) if row else None


def active_keys_named(session: Session, project_id: str, name: str) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.project_id == project_id, ApiKey.name == name,
                                                     ApiKey.revoked_at.is_(None))))


def list_keys(session: Session, project_id: str | None = None) -> list[tuple[ApiKey, Project]]:
    stmt = select(ApiKey, Project).join(Project, Project.id == ApiKey.project_id).order_by(ApiKey.seq)
    if project_id:
        stmt = stmt.where(ApiKey.project_id == project_id)
    return [(key, project) for key, project in session.execute(stmt)]


def get_live_dashboard_session(session: Session, session_id: str,
                               now: float) -> tuple[DashboardSession, ApiKey, Project] | None:
    """A signed-in session that is neither signed out nor expired, whose key is still active, with its project."""
    stmt = (select(DashboardSession, ApiKey, Project)
            .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
            .join(Project, Project.id == ApiKey.project_id)
            .where(DashboardSession.id == session_id, DashboardSession.revoked_at.is_(None),
                   DashboardSession.expires_at > now, ApiKey.revoked_at.is_(None)))
    row = session.execute(stmt).first()
    return (row[0], row[1], row[2]) if row else None


def get_dashboard_session(session: Session, session_id: str) -> DashboardSession | None:
    return session.scalar(select(DashboardSession).where(DashboardSession.id == session_id))


def delete_expired_dashboard_sessions(session: Session, now: float) -> None:
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
