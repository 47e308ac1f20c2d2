"""The sweep: every job and file state has an exit, whatever the broker lost or the workers left behind.

One pass, safe to run from several places at once: each kind of row is selected `FOR UPDATE SKIP LOCKED`, so two
sweeps never handle one row twice, and every deadline is compared with the database's clock (db/clock.py), so a
sweeper whose host clock is wrong judges leases as the workers that stamped them did. What it does, and what each
fault costs a job, is stated in docs/operations.md.

- A running job whose lease expired lost its worker: it is requeued (resuming from its last checkpoint) and that
  spends an attempt; at the bound it fails `worker_lost`; a cancel that was asked is finished instead.
- A queued job no worker claimed by its deadline had its message lost (broker restarted, down during the send):
  the message is sent again with a doubling wait, counted in `resends`, never in attempts. A queued job with a
  cancel asked is cancelled (no claim takes it), and one that can never be claimed fails with the reason.
- A file still `uploaded` past its deadline had its validation message lost: sent again the same way.
- A merge still pending past its deadline: sent again the same way, so `/merged` does not answer 202 forever.
- A file past its `expires_after` is deleted (reads already treat it as gone), unless an unfinished job uses it.
"""

import logging

from core import queue
from core.settings import Settings, get_settings
from core.storage import get_storage
from db import lifecycle
from db.clock import db_now
from db.models import Job
from db.repositories import files as files_repo
from db.repositories import jobs as repo
from db.session import after_commit, transaction

log = logging.getLogger("lorajobs.sweep")

# Rows of each kind one pass takes; a longer backlog is finished by the next passes.
BATCH = 500


def sweep(settings: Settings | None = None) -> dict[str, int]:
    """One pass; returns how many rows of each outcome it settled."""
    settings = settings or get_settings()
    counts = dict.fromkeys(("requeued", "failed", "cancelled", "resent", "files_resent", "merges_resent",
                            "files_expired"), 0)
    with transaction(settings.database_url) as session:
        now = db_now(session)
        for job in repo.expired_leases(session, BATCH):
            _lease_expired(session, settings, job, counts)
        for job in repo.stale_queued(session, BATCH):
            _stale_queued(session, settings, job, now, counts)
        for row in files_repo.stale_validations(session, settings.validation_resend_seconds, BATCH):
            row.resends += 1
            row.resend_at = now + lifecycle.resend_delay(settings, settings.validation_resend_seconds, row.resends)
            _send_after_commit(session, settings, queue.VALIDATE_FILE, row.id)
            counts["files_resent"] += 1
        for job in repo.pending_merges(session, BATCH):
            counts["merges_resent"] += _stale_merge(session, settings, job, now)
        counts["files_expired"] = lifecycle.purge_expired_files(session, get_storage(settings))
    if any(counts.values()):
        log.info("sweep", extra=counts)
    return counts


def _lease_expired(session, settings: Settings, job: Job, counts: dict[str, int]) -> None:
    job.lease_owner = None
    if job.cancel_requested:
        _cancel(session, job, "Job cancelled (its worker stopped before confirming)", counts)
    elif _fail_if_unrunnable(session, job, counts):
        pass
    elif job.attempts >= settings.max_attempts:
        lifecycle.fail(session, job, "worker_lost",
                       f"The worker training this job was lost {job.attempts} times (killed, out of host "
                       "memory or the machine went away); giving up. Check the worker's logs and resources, "
                       "then create the job again.")
        counts["failed"] += 1
    else:
        steps = [c.step for c in repo.checkpoints(session, job.id)]
        resume = f"it resumes from checkpoint step {max(steps)}" if steps else "it restarts from the start"
        lifecycle.add_event(session, job, f"The worker was lost (lease expired); job requeued, {resume} "
                            f"(attempt {job.attempts + 1} of {settings.max_attempts})", level="warn")
        lifecycle.enqueue(session, settings, job)
        counts["requeued"] += 1


def _stale_queued(session, settings: Settings, job: Job, now: float, counts: dict[str, int]) -> None:
    if job.cancel_requested:
        # A cancel that landed while the job went back to the queue (a crash after the cancel, or the sweep's own
        # requeue racing the API): the claim refuses such a job, so without this it would be resent forever.
        _cancel(session, job, "Job cancelled (it was back in the queue when the cancel arrived)", counts)
    elif not _fail_if_unrunnable(session, job, counts):
        job.resends += 1
        job.lease_expires_at = now + lifecycle.resend_delay(settings, settings.lease_seconds, job.resends)
        _send_after_commit(session, settings, queue.TRAIN_JOB, job.id, queue_name=lifecycle.training_queue(job))
        counts["resent"] += 1


def _cancel(session, job: Job, message: str, counts: dict[str, int]) -> None:
    job.status, job.lease_owner, job.finished_at = "cancelled", None, db_now(session)
    lifecycle.add_event(session, job, message)
    counts["cancelled"] += 1


def _fail_if_unrunnable(session, job: Job, counts: dict[str, int]) -> bool:
    why = lifecycle.unrunnable(session, job)
    if why is None:
        return False
    code, message, param = why
    lifecycle.fail(session, job, code, message, param=param)
    counts["failed"] += 1
    return True


def _stale_merge(session, settings: Settings, job: Job, now: float) -> int:
    merged = job.artifacts["merged"]
    deadline = merged.get("resend_at") or (merged.get("requested_at") or 0) + settings.merge_resend_seconds
    if deadline >= now:
        return 0
    resends = merged.get("resends", 0) + 1
    job.artifacts = {**job.artifacts, "merged": {**merged, "resends": resends, "resend_at": now + lifecycle.resend_delay(
        settings, settings.merge_resend_seconds, resends)}}
    _send_after_commit(session, settings, queue.MERGE_JOB, job.id)
    return 1


def _send_after_commit(session, settings: Settings, task: str, object_id: str, *, queue_name: str | None = None):
    after_commit(session, lambda: queue.send(settings, task, object_id, queue=queue_name))
