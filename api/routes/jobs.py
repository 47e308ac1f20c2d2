"""OpenAI's fine-tuning jobs API, plus adapter downloads."""

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep, in_transaction
from api.responses import built
from api.schemas import ListResponse
from api.schemas_jobs import AnswerObject, CheckpointObject, EventObject, JobCreate, JobObject
from api.services import artifacts
from api.services import jobs as service
from core.planning import Plan

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=JobObject | Plan)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, project: CurrentProject,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobObject | Plan:
    """Create a job, or with `"dry_run": true` answer its plan (`fine_tuning.job.plan`) and create nothing."""
    job = service.create(session, settings, project, body, idempotency_key)
    if isinstance(job, Plan):
        return job
    return service.object_with_position(session, job, project)


# The hot reads (apps and dashboards poll them): async, with their database work in one thread hop (api/deps.py
# `in_transaction`), answering the JSON of the object the service built (api/responses.py).
@router.get("", response_model=ListResponse[JobObject])
async def list_jobs(request: Request, project: CurrentProject, after: str | None = None, limit: Limit = 20,
                    status: str | None = None) -> Response:
    metadata = service.metadata_filter(list(request.query_params.multi_items()))
    return built(await in_transaction(request.app, service.object_page, project, after=after, limit=limit,
                                      status=status, metadata=metadata))


@router.get("/{job_id}", response_model=JobObject)
async def retrieve_job(request: Request, job_id: str, project: CurrentProject) -> Response:
    return built(await in_transaction(request.app, service.read_object, project, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, session: SessionDep, project: CurrentProject) -> JobObject:
    return service.to_object(service.cancel(session, project, job_id), project)


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(job_id: str, session: SessionDep, project: CurrentProject) -> JobObject:
    """Stop at the next step with a checkpoint (`paused`); no attempt is spent."""
    return service.to_object(service.pause(session, project, job_id), project)


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(job_id: str, session: SessionDep, settings: SettingsDep, project: CurrentProject) -> JobObject:
    """Queue a paused job again; it resumes from its last checkpoint."""
    return service.to_object(service.resume(session, settings, project, job_id), project)


@router.get("/{job_id}/events", response_model=ListResponse[EventObject])
def list_events(job_id: str, session: SessionDep, project: CurrentProject, after: str | None = None,
                limit: Limit = 20) -> ListResponse[EventObject]:
    page = service.events(session, project, job_id, after=after, limit=limit)
    return ListResponse.of([service.event_object(e) for e in page.items], page.has_more)


@router.get("/{job_id}/answers", response_model=ListResponse[AnswerObject])
def list_answers(job_id: str, session: SessionDep, project: CurrentProject) -> ListResponse[AnswerObject]:
    """Greedy answers of the base and the tuned model to the held-out sample, each scored (job.quality sums them)."""
    return ListResponse.of(service.answers(session, project, job_id), False)


@router.get("/{job_id}/checkpoints", response_model=ListResponse[CheckpointObject])
def list_checkpoints(job_id: str, session: SessionDep, project: CurrentProject, after: str | None = None,
                     limit: Limit = 10) -> ListResponse[CheckpointObject]:
    job = service.get(session, project, job_id)
    page = service.checkpoints(session, project, job_id, after=after, limit=limit)
    return ListResponse.of([service.checkpoint_object(job, project, c) for c in page.items], page.has_more)


@router.get("/{job_id}/adapter", response_model=None)
def download_adapter(job_id: str, session: SessionDep, storage: StorageDep, project: CurrentProject,
                     format: Literal["tar.gz", "zip"] = "tar.gz", checkpoint: str | None = None,
                     redirect: bool = True) -> StreamingResponse | RedirectResponse:
    archive = artifacts.adapter_archive(session, storage, project, job_id, fmt=format, checkpoint_id=checkpoint)
    return artifacts.respond(storage, archive, redirect=redirect)


@router.get("/{job_id}/merged", response_model=None)
def download_merged(job_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep,
                    project: CurrentProject, redirect: bool = True) -> StreamingResponse | RedirectResponse | JSONResponse:
    """The adapter merged into its full-precision base as a tar of a normal HF model folder (202 while produced)."""
    merged = artifacts.merged_model(session, settings, project, job_id)
    if isinstance(merged, dict):
        return JSONResponse(merged, status_code=202, headers={"retry-after": "5"})
    return artifacts.respond(storage, merged, redirect=redirect)
