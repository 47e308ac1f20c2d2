"""Fine-tuning jobs: create (validated before anything is queued), read, cancel; the worker does the rest."""

import hashlib
import json
import re
import secrets
import time
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import limits
from api.schemas import ListResponse
from api.schemas_jobs import (
    AnswerObject,
    CheckpointMetrics,
    CheckpointObject,
    EventObject,
    Hyperparameters,
    JobCreate,
    JobError,
    JobObject,
    Metadata,
    Method,
    Progress,
    ServedEval,
    SupervisedMethod,
)
from core import routing
from core.architectures import check_quantization, resolve_targets
from core.catalogue import CatalogueModel, model_config
from core.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from core.ids import new_id
from core.planning import Plan
from core.settings import Settings
from core.spec import JobSpec
from core.templates import has_chat_template
from db.models import Checkpoint, File, Job, JobEvent, Project
from db import catalogue, lifecycle
from db.repositories import files as files_repo
from db.repositories import jobs as repo
from db.repositories.jobs import JobFields
from db.repositories import workers as workers_repo
from db.repositories.pagination import Page

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _param_from_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def build_spec(body: JobCreate) -> JobSpec:
    """The job spec from an OpenAI-style body: `hyperparameters`/`method` and our extra fields."""
    if body.method is not None and body.method.type != "supervised":
        raise InvalidRequest(f"Method '{body.method.type}' is not supported yet; use 'supervised'.",
                             param="method.type")
    if body.integrations:
        raise InvalidRequest("Integrations are not supported; watch jobs through events or the dashboard.",
                             param="integrations")
    fields: dict[str, Any] = dict(body.model_extra or {})
    sources = [("hyperparameters", body.hyperparameters)]
    if body.method and body.method.supervised:
        sources.append(("method.supervised.hyperparameters", body.method.supervised.hyperparameters))
    for where, hyper in sources:
        for name, value in (hyper.model_dump(exclude_none=True) if hyper else {}).items():
            if name in fields and fields[name] != value:
                raise InvalidRequest(f"{name} is given twice with different values ({where} and the body).",
                                     param=f"{where}.{name}")
            fields[name] = value
    fields["model"] = body.model
    fields["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**31)
    try:
        return JobSpec.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_from_loc(error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"Unknown field '{param}'; see docs/job-spec.md for the job spec's fields."
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param) from None


def check_model_fit(spec: JobSpec, model: CatalogueModel) -> dict:
    """Refuse, before anything queues, adapter layers the model lacks, a 4-bit base transformers cannot make and a
    chat template the model does not have; returns the model's config.json for the planner to reuse."""
    config = model_config(model)
    resolve_targets(config, spec.lora.target_modules)
    check_quantization(config, spec.quantization)
    if spec.chat_template == "model" and not has_chat_template(model.path):
        raise InvalidRequest(f"The model '{model.id}' has no chat template; use chat_template 'plain' or 'chatml' "
                             "(or 'auto').", param="chat_template", code="no_chat_template")
    return config


def _usable_file(session: Session, project: Project, file_id: str, param: str) -> File:
    row = files_repo.get(session, project.id, file_id)
    if row is None:
        raise InvalidRequest(f"{param} {file_id} does not exist.", param=param, code="invalid_file")
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{param} {file_id} has purpose '{row.purpose}'; upload training data with purpose "
                             "'fine-tune'.", param=param, code="invalid_file")
    if row.status == "error":
        raise InvalidRequest(f"{param} {file_id} failed validation: {row.status_details} "
                             f"(see GET /v1/files/{file_id}/report).", param=param, code="invalid_file")
    return row


def _check_trainable(report: dict | None, spec: JobSpec, param: str) -> None:
    """Refuse a dataset whose report says no example keeps a trained token at this length."""
    stats = ((report or {}).get("token_stats") or {}).get(spec.model)
    if not stats or not stats.get("count"):
        return
    if stats.get("max_seq_length", 0) >= spec.max_seq_length and \
            stats.get("no_trainable_after_truncation") == stats["count"]:
        raise InvalidRequest(f"No example would keep a trained token at max_seq_length {spec.max_seq_length}: "
                             "raise max_seq_length or shorten the prompts.", param=param, code="no_trainable_examples")


def create(session: Session, settings: Settings, project: Project, body: JobCreate,
           idempotency_key: str | None = None) -> Job | Plan:
    """Create and queue a job, or with `dry_run` only its plan; a job that fits no configured class is refused."""
    dry_run = (body.model_extra or {}).pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false.", param="dry_run")
    body_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True)
                               .encode()).hexdigest()
    if idempotency_key and not dry_run:
        existing = repo.get_by_idempotency_key(session, project.id, idempotency_key)
        if existing is not None:
            return _replayed(existing, body_hash)
    spec = build_spec(body)
    try:
        model = catalogue.resolve(session, settings.models_dir, spec.model)
    except ModelNotFound as exc:
        raise InvalidRequest(exc.message, param="model", code="model_not_found") from None
    config = check_model_fit(spec, model)
    training = _usable_file(session, project, body.training_file, "training_file")
    validation = _usable_file(session, project, body.validation_file, "validation_file") \
        if body.validation_file else None
    _check_trainable(training.report, spec, "training_file")
    ready = all(f.status == "processed" for f in (training, validation) if f is not None)
    plan = lifecycle.plan(settings, spec, training, separate_validation=validation is not None, config=config)
    if ready:
        spec = lifecycle.settle_quantization(spec, plan)
    placement = routing.place(settings, spec, plan) if ready else None
    if placement is not None:
        _note_unserved(session, plan, placement)
    if dry_run:
        return plan
    if idempotency_key:  # a retry that waited on the project's lock for its first request finds that job
        limits.hold_project(session, project)
        existing = repo.get_by_idempotency_key(session, project.id, idempotency_key)
        if existing is not None:
            return _replayed(existing, body_hash)
    limits.check_job_quota(session, settings, project, plan.model_dump(mode="json"), placement)
    job = Job(id=new_id("ftjob"), project_id=project.id, model=spec.model, training_file_id=training.id,
              validation_file_id=validation.id if validation else None, status="validating_files",
              spec=spec.model_dump(mode="json"), suffix=body.suffix or None, seed=spec.seed,
              user_metadata=body.metadata, idempotency_key=idempotency_key,
              idempotency_hash=body_hash if idempotency_key else None, result_files=[], attempts=0,
              cancel_requested=False, created_at=time.time(), plan=plan.model_dump(mode="json"), placement=placement)
    try:
        with session.begin_nested():
            repo.add(session, job)
    except IntegrityError:
        existing = repo.get_by_idempotency_key(session, project.id, idempotency_key or "")
        if existing is None:
            raise
        return _replayed(existing, body_hash)
    lifecycle.add_event(session, job, f"Created fine-tuning job {job.id}")
    if ready:
        lifecycle.resolve_hyperparameters(job, training, config)
        lifecycle.enqueue(session, settings, job)  # warns in an event when no live worker serves its queue
    else:
        lifecycle.add_event(session, job, "Waiting for the dataset's validation to finish")
    return job


def _replayed(existing: Job, body_hash: str) -> Job:
    """The job an Idempotency-Key already created, when the body is the one it was created with."""
    if existing.idempotency_hash is not None and existing.idempotency_hash != body_hash:
        raise Conflict(f"This Idempotency-Key was used with a different request body (job {existing.id}); use a new "
                       "key for a different job.", param="Idempotency-Key", code="idempotency_key_reused")
    return existing


def _note_unserved(session: Session, plan: Plan, placement: dict) -> None:
    """Say in the plan when no live worker consumes the job's queue (worker heartbeats)."""
    unserved = workers_repo.unserved_message(session, placement["queue"], placement.get("class"))
    if unserved:
        placement["unserved"] = unserved
        plan.notes.append(unserved)


def get(session: Session, project: Project, job_id: str) -> Job:
    return _found(repo.get(session, project.id, job_id), job_id)


def _found(job, job_id: str):
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def page(session: Session, project: Project, *, after: str | None, limit: int, status: str | None = None,
         metadata: dict[str, str] | None = None) -> Page[Job]:
    return repo.page(session, project.id, after=after, limit=limit, status=status, metadata=metadata)


def read_object(session: Session, project: Project, job_id: str) -> JobObject:
    """`GET /v1/fine_tuning/jobs/{id}`: the job object, read from the columns it shows only (repo.JobFields)."""
    return object_with_position(session, _found(repo.get_fields(session, project.id, job_id), job_id), project)


def object_page(session: Session, project: Project, *, after: str | None, limit: int, status: str | None = None,
                metadata: dict[str, str] | None = None) -> ListResponse[JobObject]:
    """`GET /v1/fine_tuning/jobs`: a page of job objects, read from the columns they show only (repo.JobFields)."""
    page = repo.fields_page(session, project.id, after=after, limit=limit, status=status, metadata=metadata)
    positions = queue_positions(session, page.items)
    return ListResponse.of([to_object(job, project, positions.get(job.id)) for job in page.items], page.has_more)


def cancel(session: Session, project: Project, job_id: str) -> Job:
    job = get(session, project, job_id)
    if job.status in repo.TERMINAL_STATUSES:
        raise Conflict(f"Job {job_id} has already {job.status}; only a job that has not finished can be cancelled.",
                       param="fine_tuning_job_id", code="job_already_finished")
    if job.status == "running":
        if not job.cancel_requested:
            job.cancel_requested = True
            lifecycle.add_event(session, job, "Cancellation requested; the job stops at the end of the current step")
    else:
        job.status = "cancelled"
        job.cancel_requested = True
        job.finished_at = time.time()
        lifecycle.add_event(session, job, "Job cancelled before it started")
    return job


def pause(session: Session, project: Project, job_id: str) -> Job:
    """OpenAI's `jobs.pause`: a running job stops at its next step with a checkpoint and turns `paused` once its
    worker stored it; a queued job is paused at once. No attempt is spent (docs/operations.md)."""
    job = get(session, project, job_id)
    if job.status == "running":
        if not job.pause_requested:
            job.pause_requested = True
            lifecycle.add_event(session, job, "Pause requested; the job stops at its next step with a checkpoint")
    elif job.status == "queued":
        job.status, job.lease_expires_at = "paused", None
        lifecycle.add_event(session, job, "Job paused before its next attempt started")
    elif job.status != "paused":
        raise Conflict(f"Job {job_id} is {job.status}; only a queued or running job can be paused.",
                       param="fine_tuning_job_id", code="job_not_pausable")
    return job


def resume(session: Session, settings: Settings, project: Project, job_id: str) -> Job:
    """OpenAI's `jobs.resume`: a paused job is queued again and resumes from its last checkpoint; a pause not yet
    carried out is withdrawn."""
    job = get(session, project, job_id)
    if job.status == "running" and job.pause_requested:
        job.pause_requested = False
        lifecycle.add_event(session, job, "Pause withdrawn; the job goes on")
    elif job.status == "paused":
        job.pause_requested = False
        lifecycle.add_event(session, job, "Job resumed")
        lifecycle.enqueue(session, settings, job)
    else:
        raise Conflict(f"Job {job_id} is {job.status}; only a paused job can be resumed.",
                       param="fine_tuning_job_id", code="job_not_paused")
    return job


def events(session: Session, project: Project, job_id: str, *, after: str | None, limit: int,
           order: Literal["asc", "desc"] = "desc") -> Page[JobEvent]:
    get(session, project, job_id)
    return repo.events_page(session, job_id, after=after, limit=limit, order=order)


def answers(session: Session, project: Project, job_id: str) -> list[AnswerObject]:
    """The base's and the tuned model's answers to the job's held-out sample; empty until it succeeded with one."""
    return [AnswerObject(**row) for row in (get(session, project, job_id).result or {}).get("answers") or []]


def checkpoints(session: Session, project: Project, job_id: str, *, after: str | None,
                limit: int) -> Page[Checkpoint]:
    get(session, project, job_id)
    return repo.checkpoints_page(session, job_id, after=after, limit=limit)


def checkpoint_model_name(job: Job, project: Project, checkpoint: Checkpoint) -> str:
    return f"{lifecycle.fine_tuned_model_name(job, project.name)}:ckpt-step-{checkpoint.step}"


def _hyperparameters(job: Job | JobFields) -> Hyperparameters:
    resolved = job.hyperparameters or {}
    spec = job.spec
    return Hyperparameters(**{name: resolved.get(name) or spec.get(name) for name in OPENAI_HYPERPARAMETERS})


def queue_positions(session: Session, jobs: list[Job | JobFields]) -> dict[str, tuple[int, float | None]]:
    """For each queued job: (its place in its queue, 1 = next; estimated finish) from the plans of the jobs ahead.

    Jobs ahead are the running and earlier queued jobs of the same queue, each worker taken to run one at a time:
    a running job counts its remaining time, a queued one its planned duration.
    """
    if not any(job.status == "queued" for job in jobs):
        return {}
    now = time.time()
    ahead: dict[str, tuple[int, float | None]] = {}
    found = {}
    for job in repo.active(session):
        name = lifecycle.training_queue(job)
        count, seconds = ahead.get(name, (0, 0.0))
        planned = routing.planned_seconds(job.plan, job.placement)
        if job.status == "queued":
            found[job.id] = (count + 1, None if seconds is None or planned is None else now + seconds + planned)
            remaining = planned
        elif job.estimated_finish:
            remaining = max(0.0, job.estimated_finish - now)
        else:
            done = (job.progress or {}).get("percent") or 0.0
            remaining = None if planned is None else planned * (1 - done / 100)
        ahead[name] = (count + 1, None if seconds is None or remaining is None else seconds + remaining)
    return found


def object_with_position(session: Session, job: Job | JobFields, project: Project) -> JobObject:
    """The job object, with its queue position and estimated finish when queued."""
    return to_object(job, project, queue_positions(session, [job]).get(job.id))


def to_object(job: Job | JobFields, project: Project, position: tuple[int, float | None] | None = None) -> JobObject:
    spec = job.spec
    hyper = _hyperparameters(job)
    progress = Progress(**job.progress) if job.progress else None
    return JobObject(
        id=job.id, created_at=int(job.created_at), error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model, finished_at=int(job.finished_at) if job.finished_at else None,
        hyperparameters=hyper, model=job.model, organization_id=project.id, result_files=job.result_files or [],
        seed=job.seed, status=job.status, training_file=job.training_file_id,
        # OpenAI: null until the job has finished.
        trained_tokens=job.trained_tokens if job.status in repo.TERMINAL_STATUSES else None,
        validation_file=job.validation_file_id,
        estimated_finish=_estimated_finish(job, position),
        metadata=job.user_metadata, method=Method(type="supervised", supervised=SupervisedMethod(hyperparameters=hyper)),
        suffix=job.suffix, quantization=spec["quantization"], lora=spec["lora"], max_seq_length=spec["max_seq_length"],
        learning_rate=(job.hyperparameters or {}).get("learning_rate") or spec.get("learning_rate"), spec=spec,
        resolved_hyperparameters=job.hyperparameters, progress=progress, baseline_eval_loss=job.baseline_eval_loss,
        final_eval_loss=job.final_eval_loss, adapter_sha256=job.adapter_sha256,
        cancel_requested=job.cancel_requested, pause_requested=job.pause_requested, attempts=job.attempts,
        resends=job.resends,
        **(job.parameters or {}),
        chat_template=(job.result or {}).get("chat_template"), served_eval=served_eval(job.result),
        quality=(job.result or {}).get("quality"), delivered_checkpoint=(job.result or {}).get("best_checkpoint"),
        plan=job.plan, placement=job.placement, queue_position=position[0] if position else None,
    )


def _estimated_finish(job: Job | JobFields, position: tuple[int, float | None] | None) -> int | None:
    if job.status == "running" and job.estimated_finish:
        return int(job.estimated_finish)
    if job.status == "queued" and position and position[1] is not None:
        return int(position[1])
    return None


def served_eval(result: dict | None) -> ServedEval | None:
    served = (result or {}).get("served_eval")
    if not served:
        return None
    return ServedEval(merge_base=served["merge_base"], **{
        f"{key}_loss": served[key]["loss"]
        for key in ("adapter_on_full_precision_base", "merged_full_precision", "merged_dequantized_4bit")})


def event_object(event: JobEvent) -> EventObject:
    return EventObject(id=event.id, created_at=int(event.created_at), level=event.level, message=event.message,
                       type=event.type, data=event.data)


def checkpoint_object(job: Job, project: Project, checkpoint: Checkpoint) -> CheckpointObject:
    metrics = {k: v for k, v in checkpoint.metrics.items() if k in CheckpointMetrics.model_fields and k != "step"}
    return CheckpointObject(id=checkpoint.id, created_at=int(checkpoint.created_at),
                            fine_tuned_model_checkpoint=checkpoint_model_name(job, project, checkpoint),
                            fine_tuning_job_id=job.id, metrics=CheckpointMetrics(step=checkpoint.step, **metrics),
                            step_number=checkpoint.step, sha256=checkpoint.sha256)


METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")


METADATA = TypeAdapter(Metadata)


def metadata_filter(query_items: list[tuple[str, str]]) -> dict[str, str]:
    """`metadata[k]=v` query parameters as a dict (OpenAI's list filter), held to the limits metadata is held to."""
    found = {}
    for key, value in query_items:
        match = METADATA_QUERY.match(key)
        if match:
            found[match.group(1)] = value
    try:
        return METADATA.validate_python(found)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = f"metadata[{error['loc'][0]}]" if error["loc"] else "metadata"
        raise InvalidRequest(f"{param}: {error['msg']} (metadata keys are 1 to 64 characters without '\"' or '\\', "
                             "values at most 512 characters, 16 pairs at most).", param=param) from None
