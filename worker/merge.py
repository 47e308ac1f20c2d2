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
from worker.jobs import job_prefix

log = logging.getLogger("lorajobs.worker.merge")


def _set_merged(database_url: str, job_id: str, entry: dict) -> bool:
    """Record the merge's outcome; False when the fine-tuned model was deleted meanwhile (nothing is recorded)."""
    with transaction(database_url) as session:
        job = repo.get_any(session, job_id, for_update=True)
        if job.model_deleted_at is not None:
            return False
        # The sweep's count of resent merge messages stays with the result (docs/operations.md).
        resends = ((job.artifacts or {}).get("merged") or {}).get("resends")
        job.artifacts = {**(job.artifacts or {}), "merged": {**entry, **({"resends": resends} if resends else {})}}
    return True


def merge_job(job_id: str) -> None:
    """Produce the merged model of a succeeded job whose merge is pending; any other state is left alone."""
    from worker.training import merge_adapter

    settings = get_settings()
    storage = get_storage(settings)
    with transaction(settings.database_url) as session:
        job = repo.get_any(session, job_id)
        merged = (job.artifacts or {}).get("merged", {}) if job else {}
        if job is None or merged.get("status") != "pending":
            return
        adapter_key, project_id, base_model = job.artifacts["tar.gz"]["key"], job.project_id, job.model
        # QLoRA: the merge that scored better on held-out data when the job finished (worker/training/pipeline.py).
        served = (job.result or {}).get("served_eval") or {}
        dequantized = JobSpec.model_validate(job.spec) if served.get("merge_base") == "dequantized_4bit" else None
    try:
        with tempfile.TemporaryDirectory(prefix=f"lorajobs-merge-{job_id}-") as tmp:
            work = Path(tmp)
            storage.download_to(adapter_key, work / "adapter.tar.gz")
            adapter = unpack_archive(work / "adapter.tar.gz", work / "adapter")
            ensure_model(settings, storage, base_model)  # the catalogue's base, downloaded once per host
            merge_adapter(adapter, work / "merged", settings.models_dir, dequantized=dequantized)
            archive = make_archive(work / "merged", work / f"merged.{MERGED_FORMAT}", MERGED_FORMAT)
            stored = storage.put_file(f"{job_prefix(project_id, job_id)}/merged.{MERGED_FORMAT}", archive)
        if not _set_merged(settings.database_url, job_id, {"status": "ready", "key": stored.key,
                                                           "sha256": stored.sha256, "bytes": stored.size,
                                                           "finished_at": time.time()}):
            storage.delete(stored.key)  # `DELETE /v1/models/{model}` ran during the merge: keep nothing of it
    except Exception as exc:  # recorded on the job; asking again retries
        log.exception("merge failed", extra={"job_id": job_id})
        _set_merged(settings.database_url, job_id, {"status": "failed", "message": f"{type(exc).__name__}: {exc}"[:500]})
