"""Projects and API keys: a key belongs to one project and only its sha256 is stored."""

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from core.errors import AuthenticationError, InvalidRequest, NotFound
from core.ids import new_id
from db.models import ApiKey, Project
from db.repositories import projects as repo

KEY_PREFIX = "lj-"
VISIBLE_PREFIX_LENGTH = 11  # "lj-" and 8 characters: enough to tell keys apart in a list


@dataclass
class NewKey:
    key: str
    row: ApiKey
    project: Project


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_project(session: Session, name: str) -> Project:
    """The project named `name`, created when missing."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequest("A project name needs 1 to 100 characters.", param="project")
    project = repo.get_project_by_name(session, name)
    if project is None:
        project = Project(id=new_id("proj"), name=name, created_at=time.time())
        repo.add(session, project)
    return project


def create_key(session: Session, project_name: str, *, name: str | None = None, key: str | None = None) -> NewKey:
    """A new key for the project (created if needed); the clear key is returned here and never again."""
    project = ensure_project(session, project_name)
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key", 16),
        project_id=project.id,
        prefix=key[:VISIBLE_PREFIX_LENGTH],
        key_hash=hash_key(key),
        name=name,
        created_at=time.time(),
    )
    repo.add(session, row)
    return NewKey(key, row, project)


def ensure_bootstrap_key(session: Session, key: str) -> None:
    """Make sure project `default` exists and `key` is one of its active keys."""
    existing = repo.get_active_key_by_hash(session, hash_key(key))
    project = ensure_project(session, "default")
    if existing is None:
        create_key(session, "default", name="bootstrap", key=key)
    elif existing.project_id != project.id:
        raise InvalidRequest("LORAJOBS_BOOTSTRAP_API_KEY already belongs to another project.")


def authenticate(session: Session, key: str | None) -> Project:
    """The project of an active API key, or a 401."""
    if not key:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    shown = key[:VISIBLE_PREFIX_LENGTH] + "…" if len(key) > VISIBLE_PREFIX_LENGTH else "…"
    return authenticate_key_hash(session, hash_key(key), shown=shown)


def authenticate_key_hash(session: Session, key_hash: str, *, shown: str = "…") -> Project:
    """The project of the active key with this sha256 (the dashboard's session holds the hash), or a 401."""
    project = repo.get_project_by_active_key_hash(session, key_hash)
    if project is None:
        raise AuthenticationError(f"Incorrect API key provided: {shown}")
    return project


def list_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    project_id = None
    if project_name:
        project = repo.get_project_by_name(session, project_name)
        if project is None:
            raise NotFound(f"No project named '{project_name}'.", param="project")
        project_id = project.id
    return repo.list_keys(session, project_id)


def revoke_key(session: Session, key_id_or_prefix: str) -> ApiKey:
    matches = [key for key, _ in repo.list_keys(session) if key_id_or_prefix in (key.id, key.prefix)]
    if len(matches) != 1:
        raise NotFound(f"No single API key with id or prefix '{key_id_or_prefix}'.", param="key")
    matches[0].revoked_at = matches[0].revoked_at or time.time()
    return matches[0]
