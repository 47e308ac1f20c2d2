"""A merged model on request: the job's adapter folded into its full-precision base, stored once as a tar."""

import logging
import tempfile
import time
from pathlib import Path

from core.archives import MERGED_FORMAT, make_archive, unpack_archive
from core.settings import get_settings
from core.spec import JobSpec
from core.storage import get_storage
from db.repositories import jobs as repo
from db.session import transaction
from worker.catalogue import ensure_model
from worker.jobs import Renewal, job_prefix, new_owner

log = logging.getLogger("lorajobs.worker.merge")


def _set_merged(database_url: str, job_id: str, owner: str, entry: dict) -> bool:
    """Record the merge's outcome; False, recording nothing, when the fine-tuned model was deleted meanwhile or this
    worker's claim was taken over (it lapsed while the database was out of reach, and another worker now merges)."""
    with transaction(database_url) as session:
        job = repo.get_any(session, job_id, for_update=True)
        merged = (job.artifacts or {}).get("merged") or {}
        if job.model_deleted_at is not None or merged.get("claimed_by") != owner:
            return False
        # The sweep's count of resent merge messages stays with the result (docs/operations.md).
        resends = merged.get("resends")
        job.artifacts = {**(job.artifacts or {}), "merged": {**entry, **({"resends": resends} if resends else {})}}
    return True


class MergeClaim(Renewal):
    """Holds a merge for this worker: `claimed_until` in the job's merge entry, renewed while the merge runs.

    The sweep sends a merge again when it is still pending `LORAJOBS_MERGE_RESEND_SECONDS` after it was asked for
    (its message may have been lost); a 70B merge can outlast that. A message that finds the merge claimed by a live
    worker leaves it, so it never runs twice at once; one that finds the claim expired (its worker died) takes over.
    """

    what = "merge claim"

    def __init__(self, settings, job_id: str, owner: str):
        super().__init__(settings, job_id, owner, name=f"merge-claim-{job_id}")

    def take(self) -> tuple[str, str, str, JobSpec | None] | None:
        """Claim the merge if it is pending and nobody else holds it: the adapter's key, the project, the base
        model, and for QLoRA the spec whose dequantized base scored better (else None); None when not claimed."""
        with transaction(self.settings.database_url) as session:
            job = repo.get_any(session, self.job_id, for_update=True)
            merged = (job.artifacts or {}).get("merged", {}) if job else {}
            if job is None or merged.get("status") != "pending":
                return None
            if merged.get("claimed_by") not in (None, self.owner) and merged.get("claimed_until", 0) > time.time():
                log.info("merge already running elsewhere", extra={"job_id": self.job_id})
                return None
            job.artifacts = {**job.artifacts, "merged": {**merged, **self._claim()}}
            # QLoRA: the merge that scored better on held-out data when the job finished (worker/training/pipeline.py).
            served = (job.result or {}).get("served_eval") or {}
            dequantized = JobSpec.model_validate(job.spec) if served.get("merge_base") == "dequantized_4bit" else None
            return job.artifacts["tar.gz"]["key"], job.project_id, job.model, dequantized

    def _claim(self) -> dict:
        return {"claimed_by": self.owner, "claimed_until": time.time() + self.settings.lease_seconds}

    def renew(self, session) -> bool:
        job = repo.get_any(session, self.job_id, for_update=True)
        merged = (job.artifacts or {}).get("merged", {}) if job else {}
        if merged.get("status") != "pending" or merged.get("claimed_by") != self.owner:
            return False  # finished, or taken over after this claim had expired
        job.artifacts = {**job.artifacts, "merged": {**merged, **self._claim()}}
        return True


def merge_job(job_id: str, settings=None) -> None:
    """Produce the merged model of a succeeded job whose merge is pending and not running elsewhere; any other state
    is left alone."""
    from worker.training import merge_adapter

    settings = settings or get_settings()
    storage = get_storage(settings)
    claim = MergeClaim(settings, job_id, new_owner())
    taken = claim.take()
    if taken is None:
        return
    adapter_key, project_id, base_model, dequantized = taken
    claim.start()
    try:
        with tempfile.TemporaryDirectory(prefix=f"lorajobs-merge-{job_id}-") as tmp:
            work = Path(tmp)
            storage.download_to(adapter_key, work / "adapter.tar.gz")
            adapter = unpack_archive(work / "adapter.tar.gz", work / "adapter")
            ensure_model(settings, storage, base_model)  # the catalogue's base, downloaded once per host
            merge_adapter(adapter, work / "merged", settings.models_dir, dequantized=dequantized)
            archive = make_archive(work / "merged", work / f"merged.{MERGED_FORMAT}", MERGED_FORMAT)
            if claim.lost.is_set():
                log.warning("merge claim taken over; this merge's result is dropped", extra={"job_id": job_id})
                return
            # A key of this claim's own: a worker whose claim lapsed mid-upload never overwrites its successor's.
            tag = claim.owner.rsplit(":", 1)[-1]
            stored = storage.put_file(f"{job_prefix(project_id, job_id)}/merged-{tag}.{MERGED_FORMAT}", archive)
        if not _set_merged(settings.database_url, job_id, claim.owner,
                           {"status": "ready", "key": stored.key, "sha256": stored.sha256, "bytes": stored.size,
                            "finished_at": time.time()}):
            storage.delete(stored.key)  # the model deleted during the merge, or the claim lost: keep nothing of it
    except Exception as exc:  # recorded on the job; asking again retries
        log.exception("merge failed", extra={"job_id": job_id})
        _set_merged(settings.database_url, job_id, claim.owner,
                    {"status": "failed", "message": f"{type(exc).__name__}: {exc}"[:500]})
    finally:
        claim.done.set()
