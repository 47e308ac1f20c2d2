"""Garbage collection of what crashes leave behind, safe to run while jobs run (docs/operations.md).

- Incomplete writes: S3 multipart uploads (and a local object folder's temporary `.partial` files) begun more
  than the grace period ago; an API killed mid-upload never aborts its multipart upload, and its parts stay stored.
- Objects no row names, older than the grace period: the bytes of an upload whose row never committed, checkpoints
  uploaded by a worker that died before writing their row. Objects of an active job's current attempt, and of a
  merge in progress, are never touched: a row may name them any moment.
- Work folders of dead workers (`lorajobs-<job>-…` under the work folder), untouched for the grace period, whose
  job is no longer running or runs in a newer attempt; a live attempt touches its folder at every checkpoint.

The grace period (`LORAJOBS_GC_GRACE_SECONDS`, a day by default) is what makes it safe: nothing in flight is that
old without a row naming it.
"""

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from core.settings import Settings, get_settings
from core.storage import Storage, get_storage
from db.models import Checkpoint, File, Job
from db.session import transaction

log = logging.getLogger("lorajobs.gc")

ACTIVE = ("validating_files", "queued", "running")
JOB_KEY = re.compile(r"^projects/[^/]+/jobs/(?P<job>[^/]+)/(?:attempt-(?P<attempt>\d+)/)?")
WORK_FOLDER = re.compile(r"^lorajobs-(?P<merge>merge-)?(?P<job>ftjob-[A-Za-z0-9]+)-")


def collect(settings: Settings | None = None, storage: Storage | None = None) -> dict[str, int]:
    """One pass over storage and this host's work folder; returns how much of each kind it removed."""
    settings = settings or get_settings()
    storage = storage or get_storage(settings)
    before = time.time() - settings.gc_grace_seconds
    counts = {"incomplete_uploads": storage.abort_incomplete_uploads(before),
              "orphan_objects": _orphan_objects(settings, storage, before),
              "work_folders": _dead_work_folders(settings, before)}
    log.info("garbage collected", extra=counts)
    return counts


def _referenced(session) -> tuple[set[str], dict[str, tuple[str, int, bool]]]:
    """Every key a row names, and each job's (status, attempts, merge in progress)."""
    # A deleted file's row may stay as a tombstone a job's history names; its bytes are garbage all the same.
    keys = set(session.scalars(select(File.storage_key).where(File.deleted_at.is_(None))))
    for key, artifacts in session.execute(select(Checkpoint.storage_key, Checkpoint.artifacts)):
        keys.add(key)
        keys.update(entry["key"] for entry in (artifacts or {}).values() if isinstance(entry, dict) and "key" in entry)
    jobs = {}
    for job_id, status, attempts, artifacts in session.execute(select(Job.id, Job.status, Job.attempts,
                                                                      Job.artifacts)):
        entries = (artifacts or {}).values()
        keys.update(entry["key"] for entry in entries if isinstance(entry, dict) and entry.get("key"))
        jobs[job_id] = (status, attempts, ((artifacts or {}).get("merged") or {}).get("status") == "pending")
    return keys, jobs


def _in_use(key: str, jobs: dict[str, tuple[str, int, bool]]) -> bool:
    """A key a running attempt or a merge may still name in a row it has not written yet."""
    match = JOB_KEY.match(key)
    if not match or match["job"] not in jobs:
        return False
    status, attempts, merging = jobs[match["job"]]
    if merging:
        return True
    if status not in ACTIVE:
        return False
    # Keys of an earlier attempt are the lost worker's: no row will ever name them now.
    return match["attempt"] is None or int(match["attempt"]) >= attempts


def _orphan_objects(settings: Settings, storage: Storage, before: float) -> int:
    # Listed before the rows are read: an object written after the listing is not a candidate, and one whose row
    # commits between the two is younger than the grace period.
    candidates = [key for key, modified in storage.list_objects("projects/") if modified < before]
    if not candidates:
        return 0
    with transaction(settings.database_url) as session:
        keys, jobs = _referenced(session)
    removed = 0
    for key in candidates:
        if key not in keys and not _in_use(key, jobs):
            storage.delete(key)
            removed += 1
    return removed


def work_root(settings: Settings) -> Path:
    """Where workers make their per-job folders (worker/jobs.py, worker/merge.py)."""
    return Path(settings.work_dir or tempfile.gettempdir())


def _dead_work_folders(settings: Settings, before: float) -> int:
    root = work_root(settings)
    folders = []
    for path in root.glob("lorajobs-*") if root.is_dir() else []:
        match = WORK_FOLDER.match(path.name)
        try:
            touched = path.stat().st_mtime
        except FileNotFoundError:  # its worker finished meanwhile
            continue
        if match and path.is_dir() and touched < before:
            folders.append((path, match["job"], bool(match["merge"]), touched))
    if not folders:
        return 0
    with transaction(settings.database_url) as session:
        rows = {job_id: (status, started_at, artifacts) for job_id, status, started_at, artifacts in session.execute(
            select(Job.id, Job.status, Job.started_at, Job.artifacts).where(Job.id.in_({f[1] for f in folders})))}
    removed = 0
    for path, job_id, merge, touched in folders:
        status, started_at, artifacts = rows.get(job_id, (None, None, None))
        if merge:
            alive = ((artifacts or {}).get("merged") or {}).get("status") == "pending"
        else:
            alive = status == "running" and (started_at or 0) <= touched
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
