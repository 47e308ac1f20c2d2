"""Who a dashboard session belongs to: the project of its API key, looked up again on every request."""

from sqlalchemy.orm import Session

from api.services import projects
from db.models import Project


def project_for_key_hash(db: Session, key_hash: str) -> Project | None:
    """The project of the active API key with this sha256; None once the key is revoked or gone."""
    for key, project in projects.list_keys(db):
        if key.key_hash == key_hash and key.revoked_at is None:
            return project
    return None
