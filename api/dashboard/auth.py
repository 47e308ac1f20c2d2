"""Who a dashboard session belongs to: the project of its API key, looked up again on every request."""

from sqlalchemy.orm import Session

from api.services import projects
from core.errors import AuthenticationError
from db.models import Project


def project_for_key_hash(db: Session, key_hash: str) -> Project | None:
    """The project of the active API key with this sha256; None once the key is revoked or gone."""
    try:
        return projects.authenticate_key_hash(db, key_hash)
    except AuthenticationError:
        return None
