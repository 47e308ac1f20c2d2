"""Rules on a job's state that the API and the worker both apply: events, queueing, failing."""

import time

from pydantic import ValidationError
from sqlalchemy.orm import Session, object_session

from core import queue, routing
from core.catalogue import model_config
from core.errors import InvalidRequest, ModelNotFound
from core.ids import new_id
from core.planning.plan import BORROWED_TOKENS_MARGIN, borrowed_token_stats
from core.settings import Settings
from core.spec import JobSpec, model_width, resolve_auto
from core.storage import Storage
from db import catalogue
from db.clock import db_now
from db.models import File, Job, JobEvent
from db.repositories import files as files_repo
from db.repositories import jobs as repo
from db.repositories import workers as workers_repo
from db.session import after_commit


RESULTS_PURPOSE = "fine-tune-results"


def file_key(project_id: str, file_id: str) -> str:
    """Where a file's bytes live in object storage."""
    return f"projects/{project_id}/files/{file_id}"


def store_result_file(session: Session, storage: Storage, project_id: str, *, filename: str, data: bytes) -> File:
    """A file we produce for a user (a job's metrics CSV), stored and already processed."""
    file_id = new_id("file")
    stored = storage.put_bytes(file_key(project_id, file_id), data)
    row = File(id=file_id, project_id=project_id, filename=filename, purpose=RESULTS_PURPOSE, bytes=stored.size,
               sha256=stored.sha256, storage_key=stored.key, status="processed", created_at=time.time())
    files_repo.add(session, row)
    return row


EXPIRED_FILES_BATCH = 100


def delete_file(session: Session, storage: Storage, row: File) -> None:
    """Delete a file's bytes after commit; its row goes too unless a job's history names it (then it stays as a
    tombstone, invisible to every read, so `training_file` of a finished job still reads the id it trained on)."""
    key = row.storage_key
    if files_repo.count_jobs_using(session, row.id):
        row.deleted_at = time.time()
        session.flush()
    else:
        files_repo.delete(session, row)
    after_commit(session, lambda: storage.delete(key))


def purge_expired_files(session: Session, storage: Storage, project_id: str | None = None) -> int:
    """Delete files past their `expires_after` (reads already treat them as gone); a file a job that has not
    finished still needs waits for it. By the sweeper (every project) and on a project's reads."""
    purged = 0
    for row in files_repo.expired(session, EXPIRED_FILES_BATCH, project_id):
        if not files_repo.count_active_jobs_using(session, row.id):
            delete_file(session, storage, row)
            purged += 1
    return purged


def fine_tuned_model_name(job: Job, project_name: str) -> str:
    """`ft:{base}:{project}:{suffix}:{job id}`, the name serving stacks and `/v1/models` use."""
    return f"ft:{job.model}:{project_name}:{job.suffix or ''}:{job.id}"


def training_examples(spec: JobSpec, training_file: File, *, separate_validation: bool) -> int | None:
    """Examples trained on: the file's count less the validation split (None while the file is validating)."""
    examples = (training_file.report or {}).get("examples")
    if examples is None:
        return None
    if spec.validation_fraction and not separate_validation:
        examples = max(1, round(examples * (1 - spec.validation_fraction)))
    return examples


def resolve_hyperparameters(job: Job, training_file: File, config: dict | None) -> None:
    """Resolve the spec's `auto` values from the training file's size and the model's width (its `config.json`);
    the rules are kept with them."""
    spec = JobSpec.model_validate(job.spec)
    examples = training_examples(spec, training_file, separate_validation=bool(job.validation_file_id)) or 0
    job.hyperparameters = resolve_auto(spec, examples, model_width(config)).model_dump()


def plan(settings: Settings, spec: JobSpec, training_file: File, *, separate_validation: bool,
         config: dict | None = None):
    """The job's pre-flight plan from what the training file's report knows so far (core/planning)."""
    by_model = (training_file.report or {}).get("token_stats") or {}
    stats = by_model.get(spec.model)
    refused = cannot_format(training_file.report or {}, spec.model) if stats is None else None
    # Another tokenizer's count stands in only for a model the file was not counted for (added after it was validated,
    # or its tokenizer could not be fetched then), not for one whose chat template refused the file (that job needs
    # another chat_template; its rows are planned at full length).
    borrowed = borrowed_token_stats(by_model) if stats is None and refused is None else None
    made = routing.plan_job(settings, spec, token_stats=stats or borrowed, config=config,
                            n_examples=training_examples(spec, training_file, separate_validation=separate_validation),
                            text_data=(training_file.report or {}).get("format") == "text")
    if refused:
        made.notes.append(f"The training file's tokens could not be counted: {refused}")
    if borrowed:
        made.notes.append(f"The training file's tokens were not counted with {spec.model}'s tokenizer (the model was "
                          f"added after the file was validated, or its tokenizer could not be fetched then): the plan takes {borrowed['model']}'s count, "
                          f"{BORROWED_TOKENS_MARGIN:g}× longer; upload the file again for this model's own count.")
    if training_file.status != "processed":
        made.notes.append(f"The training file {training_file.id} is still being validated: the plan counts no "
                          "examples or tokens yet.")
    return made


def cannot_format(report: dict, model: str) -> str | None:
    """The validation's warning that `model`'s chat template refused the file, if it gave one."""
    for warning in report.get("warnings") or []:
        if warning.get("code") != "model_cannot_format":
            continue
        about = warning.get("model")  # absent from reports stored before the field: their message names it first
        if about == model or (about is None and warning.get("message", "").startswith(f"{model}: ")):
            return warning["message"]
    return None


def settle_quantization(spec: JobSpec, made) -> JobSpec:
    """The spec with quantization `auto` replaced by the plan's choice (made from the file's token statistics,
    once: the job keeps it through retries and resumes)."""
    return spec.model_copy(update={"quantization": made.quantization}) if spec.quantization == "auto" else spec


def plan_and_place(settings: Settings, job: Job, training_file: File) -> None:
    """Resolve the job's hyperparameters, store its plan and the class it trains on; raises DoesNotFit when it fits
    no configured class."""
    spec = JobSpec.model_validate(job.spec)
    try:  # the database's catalogue or a local folder (db/catalogue.py)
        config = model_config(catalogue.resolve(object_session(job), settings.models_dir, spec.model))
    except ModelNotFound as exc:
        raise InvalidRequest(exc.message, param="model", code="model_not_found") from None
    resolve_hyperparameters(job, training_file, config)
    made = plan(settings, spec, training_file, separate_validation=bool(job.validation_file_id), config=config)
    if training_file.status == "processed":  # a job still waiting for its file keeps `auto` until then
        spec = settle_quantization(spec, made)
        job.spec = {**job.spec, "quantization": spec.quantization}
    job.plan = made.model_dump(mode="json")
    job.placement = routing.place(settings, spec, made)


def training_queue(job: Job) -> str:
    """The queue the job was routed to (today's `gpu` queue for jobs from before routing)."""
    return (job.placement or {}).get("queue") or queue.GPU_QUEUE


def add_event(session: Session, job: Job, message: str, *, level: str = "info", type_: str = "message",
              data: dict | None = None, created_at: float | None = None) -> None:
    """`created_at`: when it happened, for an event a worker kept while the database was away."""
    repo.add(session, JobEvent(id=new_id("ftevent"), job_id=job.id, level=level, type=type_, message=message,
                               data=data, created_at=created_at or time.time()))


def enqueue(session: Session, settings: Settings, job: Job) -> None:
    """Mark queued and send the task once committed; the sweep resends it if the message is lost."""
    job.status = "queued"
    job.lease_expires_at = db_now(session) + settings.lease_seconds
    placement = job.placement or {}
    where = f" on {placement['class']} (queue {placement['queue']})" if placement.get("class") else ""
    add_event(session, job, f"Job queued for training{where}", data=placement or None)
    job_id, name = job.id, training_queue(job)
    unserved = workers_repo.unserved_message(session, name, placement.get("class"))
    if unserved:
        add_event(session, job, unserved, level="warn", data={"code": "no_live_worker", "queue": name})
    after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job_id, queue=name))


def promote_waiting_jobs(session: Session, settings: Settings, file_row: File) -> None:
    """After a file's validation: queue the jobs that waited on it, or fail them if it has errors."""
    for job in repo.waiting_on_file(session, file_row.id):
        param = "training_file" if job.training_file_id == file_row.id else "validation_file"
        if file_row.status == "error":
            fail(session, job, "invalid_file", f"{param} {file_row.id} failed validation: {file_row.status_details}",
                 param=param)
            continue
        others = [files_repo.get_any(session, fid) for fid in (job.training_file_id, job.validation_file_id) if fid]
        if all(f is not None and f.status == "processed" for f in others):
            training = files_repo.get_any(session, job.training_file_id)
            try:
                plan_and_place(settings, job, training)
            except InvalidRequest as exc:  # fits no configured class, or its model left the catalogue
                fail(session, job, exc.code, exc.message, param=exc.param)
                continue
            enqueue(session, settings, job)


def resend_delay(settings: Settings, first: float, resends: int) -> float:
    """How long after its `resends`-th resend a message is sent again: `first`, doubling, at most the setting's cap
    (a broker that stays down is not flooded; one that returns is used within the cap)."""
    return min(first * 2 ** min(resends, 30), settings.resend_backoff_max_seconds)


def unrunnable(session: Session, job: Job) -> tuple[str, str, str | None] | None:
    """Why a queued job can never be claimed — (code, message, param) — or None: what the claim reads must exist
    and its stored spec must still validate (a schema that changed in an upgrade may reject it)."""
    try:
        JobSpec.model_validate(job.spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        return ("invalid_spec", f"The job's stored spec is no longer valid for this version of lorajobs "
                f"({where or 'spec'}: {first.get('msg')}); create the job again with a valid spec.", where)
    for param, file_id in (("training_file", job.training_file_id), ("validation_file", job.validation_file_id)):
        if file_id and files_repo.get_any(session, file_id) is None:
            return ("invalid_file", f"{param} {file_id} no longer exists; create the job again with a file that "
                    "does.", param)
    return None


def fail_unclaimable(session: Session, job_id: str, exc: Exception) -> bool:
    """After a claim that raised (rolled back, so the job is still queued): fail the job with the reason, once,
    instead of leaving every resend to be refused the same way."""
    job = repo.get_any(session, job_id, for_update=True)
    if job is None or job.status != "queued":
        return False
    code, message, param = unrunnable(session, job) or (
        "claim_failed", f"The job could not be started: {type(exc).__name__}: {exc}"[:1000], None)
    fail(session, job, code, message, param=param)
    return True


def fail(session: Session, job: Job, code: str, message: str, *, param: str | None = None) -> None:
    job.status = "failed"
    job.error = {"code": code, "message": message, "param": param}
    job.finished_at = time.time()
    job.lease_owner = None
    add_event(session, job, message, level="error")
