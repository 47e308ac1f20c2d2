"""The sweep: requeue jobs whose worker was lost (lease expired) and resend tasks that were never claimed."""

import logging
import time

from core import queue
from core.settings import get_settings
from db import lifecycle
from db.repositories import jobs as repo
from db.session import after_commit, transaction

log = logging.getLogger("lorajobs.sweep")


def sweep() -> dict[str, int]:
    """One pass; safe to run from several places at once (rows are locked, skip-locked)."""
    settings = get_settings()
    now = time.time()
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    with transaction(settings.database_url) as session:
        for job in repo.expired_leases(session, now):
            job.lease_owner = None
            if job.cancel_requested:
                job.status, job.finished_at = "cancelled", now
                lifecycle.add_event(session, job, "Job cancelled (its worker stopped before confirming)")
                counts["cancelled"] += 1
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
        for job in repo.stale_queued(session, now):
            job.lease_expires_at = now + settings.lease_seconds
            job_id, name = job.id, lifecycle.training_queue(job)
            after_commit(session, lambda job_id=job_id, name=name: queue.send(settings, queue.TRAIN_JOB, job_id,
                                                                               queue=name))
            counts["resent"] += 1
    if any(counts.values()):
        log.info("sweep", extra=counts)
    return counts
