"""Who a dashboard session belongs to: its server-side session and API key, looked up again on every request."""

from sqlalchemy.orm import Session

from api.dashboard.session import DashboardSession
from api.services import projects
from api.services.projects import Caller


def signed_in_caller(db: Session, cookie: DashboardSession | None) -> Caller | None:
    """The caller of the cookie's live session; None when not signed in, signed out, expired or the key revoked."""
    if cookie is None or not cookie.signed_in:
        return None
    return projects.dashboard_caller(db, cookie.session_id)
