"""Downloads of trained adapters: streamed from storage, or a redirect to a presigned URL."""

import time
from dataclasses import dataclass

from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

from api import limits
from api.services import jobs
from core import queue
from core.archives import MERGED_FORMAT
from core.errors import Conflict, NotFound
from core.settings import Settings
from core.storage import Storage
from core.storage.base import attachment
from db.session import after_commit
from db.models import Project
from db.repositories import jobs as repo

MEDIA_TYPES = {"tar.gz": "application/gzip", "zip": "application/zip", "tar": "application/x-tar"}



@dataclass
class Archive:
    key: str
    filename: str
    sha256: str
    size: int
    fmt: str


def adapter_archive(session: Session, storage: Storage, project: Project, job_id: str, *, fmt: str,
                    checkpoint_id: str | None) -> Archive:
    """The stored archive of a job's final adapter, or of one of its checkpoints."""
    job = _with_model(session, project, job_id)
    if checkpoint_id:
        checkpoint = repo.get_checkpoint(session, job.id, checkpoint_id)
        if checkpoint is None:
            raise NotFound(f"No checkpoint {checkpoint_id} in job {job_id}.", param="checkpoint")
        artifacts, name = checkpoint.artifacts or {}, f"{job.id}-step-{checkpoint.step}-adapter"
    else:
        if job.status != "succeeded":
            raise Conflict(f"Job {job_id} is {job.status}; its adapter exists once it has succeeded "
                           "(intermediate ones: ?checkpoint=ftckpt-…).", param="fine_tuning_job_id",
                           code="adapter_not_ready")
        artifacts, name = job.artifacts or {}, f"{job.id}-adapter"
    entry = artifacts.get(fmt)
    if entry is None:
        raise NotFound(f"No {fmt} archive stored for this adapter.", param="format")
    return Archive(entry["key"], f"{name}.{fmt}", entry["sha256"], entry["bytes"], fmt)


def _with_model(session: Session, project: Project, job_id: str):
    """The job, unless its fine-tuned model was deleted (`DELETE /v1/models/{model}`): then nothing is left."""
    job = jobs.get(session, project, job_id)
    if job.model_deleted_at is not None:
        raise NotFound(f"The fine-tuned model of job {job_id} was deleted, with its adapter, merged model and "
                       "checkpoints.", param="fine_tuning_job_id", code="model_deleted")
    return job


def respond(storage: Storage, archive: Archive, *, redirect: bool) -> StreamingResponse | RedirectResponse:
    headers = {"x-content-sha256": archive.sha256,
               "content-disposition": attachment(archive.filename)}
    url = storage.presigned_get_url(archive.key, filename=archive.filename) if redirect else None
    if url:
        return RedirectResponse(url, status_code=307, headers=headers)
    headers["content-length"] = str(archive.size)
    return StreamingResponse(storage.iter_chunks(archive.key), media_type=MEDIA_TYPES[archive.fmt], headers=headers)


def merged_model(session: Session, settings: Settings, project: Project, job_id: str) -> Archive | dict:
    """The stored merged model, or its pending state (a merge is queued on the first request)."""
    job = _with_model(session, project, job_id)
    if job.status != "succeeded":
        raise Conflict(f"Job {job_id} is {job.status}; a merged model exists once it has succeeded.",
                       param="fine_tuning_job_id", code="adapter_not_ready")
    merged = (job.artifacts or {}).get("merged") or {}
    if merged.get("status") not in ("ready", "pending"):
        # Asked for at once by two requests: the second, once the first committed, finds its merge pending.
        limits.hold_project(session, project)
        session.refresh(job, with_for_update=True)
        merged = (job.artifacts or {}).get("merged") or {}
    if merged.get("status") == "ready":
        return Archive(merged["key"], f"{job.id}-merged.{MERGED_FORMAT}", merged["sha256"], merged["bytes"],
                       MERGED_FORMAT)
    message = "The merged model is being produced from the full-precision base; ask again shortly."
    if merged.get("status") == "failed":
        message = f"The last merge failed ({merged.get('message')}); it is being retried."
    if merged.get("status") != "pending":
        limits.check_merge_quota(session, settings, project)
        job.artifacts = {**job.artifacts, "merged": {"status": "pending", "requested_at": time.time()}}
        after_commit(session, lambda: queue.send(settings, queue.MERGE_JOB, job_id))
    return {"object": "fine_tuning.job.merged_model", "fine_tuning_job_id": job.id, "status": "pending",
            "message": message}
