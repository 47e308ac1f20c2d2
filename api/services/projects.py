"""Projects, API keys and dashboard sessions.

A key belongs to one project; only its HMAC-SHA256 under a server-side pepper is stored, so a copy of
the database alone cannot be used to check guesses. Keys made before the pepper hold a plain sha256
(`hash_scheme` 'sha256') until their next use rehashes them. A read-only key may only read.
"""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.services import key_cache
from core.errors import AuthenticationError, InvalidRequest, NotFound
from core.ids import new_id
from core.settings import PUBLIC_API_KEYS, Settings, get_settings
from db.models import ApiKey, DashboardSession, Project
from db.repositories import projects as repo
from db.session import after_commit

KEY_PREFIX = "lj-"
VISIBLE_PREFIX_LENGTH = 11  # "lj-" and 8 characters: enough to tell keys apart in a list
HMAC_SCHEME, LEGACY_SCHEME = "hmac-sha256", "sha256"
BOOTSTRAP_KEY_NAME = "bootstrap"
LAST_USED_RESOLUTION_SECONDS = 60  # `last_used_at` is written at most this often: not one write per request
DASHBOARD_SESSION_SECONDS = 12 * 3600


@dataclass
class NewKey:
    key: str
    row: ApiKey
    project: Project


@dataclass(frozen=True)
class Caller:
    """Who a request is from: the key's project, and whether the key may write."""

    project: Project
    key_id: str
    read_only: bool


def _pepper(settings: Settings) -> bytes:
    if settings.api_key_pepper:
        return settings.api_key_pepper.encode()
    # Derived, not the secret itself: a MAC under the session secret is never equal to a key hash.
    return hmac.new(settings.secret_key.encode(), b"lorajobs api key pepper", hashlib.sha256).digest()


def hash_key(key: str, settings: Settings | None = None) -> str:
    return hmac.new(_pepper(settings or get_settings()), key.encode(), hashlib.sha256).hexdigest()


def _hashes(key: str, settings: Settings | None) -> dict[str, str]:
    """The key's hash under each scheme a stored row may use."""
    return {HMAC_SCHEME: hash_key(key, settings), LEGACY_SCHEME: hashlib.sha256(key.encode()).hexdigest()}


def _rehash(row: ApiKey, key: str, settings: Settings | None) -> None:
    if row.hash_scheme != HMAC_SCHEME:
        row.key_hash, row.hash_scheme = hash_key(key, settings), HMAC_SCHEME


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


def create_key(session: Session, project_name: str, *, name: str | None = None, key: str | None = None,
               read_only: bool = False, settings: Settings | None = None) -> NewKey:
    """A new key for the project (created if needed); the clear key is returned here and never again."""
    project = ensure_project(session, project_name)
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key", 16),
        project_id=project.id,
        prefix=key[:VISIBLE_PREFIX_LENGTH],
        key_hash=hash_key(key, settings),
        hash_scheme=HMAC_SCHEME,
        name=name,
        read_only=read_only,
        created_at=time.time(),
    )
    repo.add(session, row)
    return NewKey(key, row, project)


def ensure_bootstrap_key(session: Session, key: str, settings: Settings | None = None) -> str | None:
    """Make `key` the one active bootstrap key of project `default`; a warning when it cannot be.

    The previous bootstrap keys are revoked (rotating LORAJOBS_BOOTSTRAP_API_KEY ends the old one). A key
    that was revoked stays revoked: start-up carries on with a warning instead of bringing it back.
    """
    project = ensure_project(session, "default")
    row = repo.get_key_by_hashes(session, _hashes(key, settings))
    if row is not None and row.project_id != project.id:
        raise InvalidRequest("LORAJOBS_BOOTSTRAP_API_KEY already belongs to another project.")
    if row is not None and row.revoked_at is not None:
        return ("LORAJOBS_BOOTSTRAP_API_KEY was revoked and stays revoked; set a new key "
                f"(revoked key {row.id}, {row.prefix}…)")
    if row is None:
        row = create_key(session, "default", name=BOOTSTRAP_KEY_NAME, key=key, settings=settings).row
    _rehash(row, key, settings)
    now = time.time()
    for previous in repo.active_keys_named(session, project.id, BOOTSTRAP_KEY_NAME):
        if previous.id != row.id:
            previous.revoked_at = now
            _forget_cached_keys(session, settings)
    return None


def _forget_cached_keys(session: Session, settings: Settings | None) -> None:
    """Once the revocation is committed, no API process goes on accepting the key from its cache."""
    settings = settings or get_settings()
    after_commit(session, lambda: key_cache.invalidate(settings))


def authenticate(session: Session, key: str | None, settings: Settings | None = None) -> Caller:
    """The caller an active API key stands for, or a 401; notes when the key was used (once a minute at most)."""
    if not key:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    found = repo.get_active_key_and_project(session, _hashes(key, settings))
    if found is None:
        shown = key[:VISIBLE_PREFIX_LENGTH] + "…" if len(key) > VISIBLE_PREFIX_LENGTH else "…"
        raise AuthenticationError(f"Incorrect API key provided: {shown}")
    row, project = found
    _rehash(row, key, settings)
    now = time.time()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION_SECONDS:
        row.last_used_at = now
    return Caller(project, row.id, row.read_only)


def start_dashboard_session(session: Session, caller: Caller) -> DashboardSession:
    """A server-side session for a person who signed in with the caller's key (expired ones are dropped)."""
    now = time.time()
    repo.delete_expired_dashboard_sessions(session, now)
    row = DashboardSession(id=secrets.token_urlsafe(32), api_key_id=caller.key_id, created_at=now,
                           expires_at=now + DASHBOARD_SESSION_SECONDS)
    repo.add(session, row)
    return row


def dashboard_caller(session: Session, session_id: str) -> Caller | None:
    """The caller of a live dashboard session; None once signed out, expired, or its key revoked."""
    found = repo.get_live_dashboard_session(session, session_id, time.time())
    if found is None:
        return None
    _, key, project = found
    return Caller(project, key.id, key.read_only)


def end_dashboard_session(session: Session, session_id: str) -> None:
    row = repo.get_dashboard_session(session, session_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = time.time()


def active_public_keys(session: Session, settings: Settings | None = None) -> list[str]:
    """Publicly known keys (the README's `lj-local-dev-key`) still active here, e.g. left by an earlier `make run`."""
    return [key for key in sorted(PUBLIC_API_KEYS)
            if repo.get_active_key_and_project(session, _hashes(key, settings)) is not None]


def list_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    project_id = None
    if project_name:
        project = repo.get_project_by_name(session, project_name)
        if project is None:
            raise NotFound(f"No project named '{project_name}'.", param="project")
        project_id = project.id
    return repo.list_keys(session, project_id)


def revoke_key(session: Session, key_id_or_prefix: str, settings: Settings | None = None) -> ApiKey:
    """Revoke a key; its dashboard sessions end with it (they are looked up through an active key), and so does
    every API process's cached copy (api/services/key_cache.py) once the revocation is committed."""
    matches = [key for key, _ in repo.list_keys(session) if key_id_or_prefix in (key.id, key.prefix)]
    if len(matches) != 1:
        raise NotFound(f"No single API key with id or prefix '{key_id_or_prefix}'.", param="key")
    matches[0].revoked_at = matches[0].revoked_at or time.time()
    _forget_cached_keys(session, settings)
    return matches[0]
