"""Uploaded datasets: streamed into storage with a sha256, validated on the cpu queue, scoped by project."""

import time
from typing import BinaryIO

from sqlalchemy.orm import Session

from api import limits
from api.schemas import FileObject
from core import queue
from core.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from core.ids import new_id
from core.settings import Settings
from core.storage import Storage
from db import lifecycle
from db.models import File, Project
from db.repositories import files as repo
from db.repositories.pagination import Page
from db.session import after_commit

UPLOAD_PURPOSES = ("fine-tune",)
# OpenAI's bounds on `expires_after[seconds]`: an hour to thirty days after `created_at`.
EXPIRES_AFTER_SECONDS = (3600, 2_592_000)


def to_object(row: File) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=int(row.created_at), filename=row.filename,
                      purpose=row.purpose, status=row.status, status_details=row.status_details, sha256=row.sha256,
                      expires_at=int(row.expires_at) if row.expires_at else None)


def expiry(anchor: str | None, seconds: int | None, created_at: float) -> float | None:
    """When a file expires from OpenAI's `expires_after` (`anchor` `created_at`, `seconds` in its bounds)."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after.anchor")
    low, high = EXPIRES_AFTER_SECONDS
    if seconds is None or not low <= seconds <= high:
        raise InvalidRequest(f"expires_after[seconds] must be between {low} and {high}.",
                             param="expires_after.seconds")
    return created_at + seconds


def clean_filename(filename: str | None) -> str:
    """The name a user gave, without folders or control characters, at most 255 characters."""
    name = "".join(c for c in (filename or "").replace("\\", "/").rsplit("/", 1)[-1] if c.isprintable()).strip()
    return name[:255] or "upload.jsonl"


def upload(session: Session, settings: Settings, storage: Storage, project: Project, *, stream: BinaryIO,
           filename: str | None, purpose: str, declared_size: int | None = None,
           expires_after: tuple[str | None, int | None] = (None, None)) -> File:
    """Stream an upload into storage, record it as `uploaded`, and queue its validation after commit."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"'{purpose}' is not a supported purpose; use one of: {', '.join(UPLOAD_PURPOSES)}.",
                             param="purpose")
    created_at = time.time()
    expires_at = expiry(*expires_after, created_at)
    limit = settings.max_upload_bytes
    if declared_size is not None and declared_size > limit:
        raise PayloadTooLarge(f"The file is larger than the {limit:,}-byte limit (LORAJOBS_MAX_UPLOAD_BYTES).",
                              param="file")
    purge_expired(session, storage, project)
    limits.check_file_quota(session, settings, project, declared_size or 0)
    # Nothing held while the bytes stream in: not the expired files' row locks (a job created meanwhile that names
    # one would wait for the whole upload, then deadlock on the project's lock), not a connection.
    session.commit()
    file_id = new_id("file")
    key = lifecycle.file_key(project.id, file_id)
    stored = storage.put_stream(key, stream, max_bytes=limit, content_type="application/jsonl")
    if stored.size == 0:
        storage.delete(key)
        raise InvalidRequest("The file is empty.", param="file", code="empty_file")
    row = File(id=file_id, project_id=project.id, filename=clean_filename(filename), purpose=purpose,
               bytes=stored.size, sha256=stored.sha256, storage_key=key, status="uploaded", created_at=created_at,
               expires_at=expires_at)
    try:
        limits.hold_project(session, project)  # counted and added as one step (not held during the upload)
        limits.check_file_quota(session, settings, project, stored.size)  # the bytes received, chunked included
        repo.add(session, row)
    except Exception:
        storage.delete(key)
        raise
    after_commit(session, lambda: queue.send(settings, queue.VALIDATE_FILE, file_id))
    return row


def get(session: Session, project: Project, file_id: str) -> File:
    row = repo.get(session, project.id, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def page(session: Session, project: Project, *, purpose: str | None, after: str | None, limit: int,
         order: str) -> Page[File]:
    return repo.page(session, project.id, purpose=purpose, after=after, limit=limit, order=order)


def delete(session: Session, storage: Storage, project: Project, file_id: str) -> None:
    row = get(session, project, file_id)
    if repo.count_active_jobs_using(session, row.id):
        raise Conflict(f"File {file_id} is used by a fine-tuning job that has not finished; cancel the job or wait "
                       "for it to finish first.", param="file_id", code="file_in_use")
    lifecycle.delete_file(session, storage, row)


def purge_expired(session: Session, storage: Storage, project: Project) -> int:
    """The project's expired files, deleted as it reads or uploads (the sweeper does every project's)."""
    return lifecycle.purge_expired_files(session, storage, project.id)
