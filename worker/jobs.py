"""A fine-tuning job on a worker: claim it, train it with a renewed lease, store what it makes, settle it.

The database row is the truth (DESIGN.md, decision 2): a duplicate or late message finds the job
claimed and does nothing; a lost worker's job is requeued by the sweep and resumes from the last
checkpoint stored here.
"""

import csv
import io
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from core import queue, routing
from core.archives import ARCHIVE_FORMATS, make_archive, sha256_file, unpack_archive
from core.errors import LorajobsError
from core.ids import new_id
from core.settings import Settings, get_settings
from core.spec import JobSpec
from core.storage import Storage, get_storage
from db import lifecycle
from db.models import Checkpoint
from db.repositories import files as files_repo
from db.repositories import jobs as repo
from db.repositories import projects as projects_repo
from db.session import after_commit, transaction

log = logging.getLogger("lorajobs.worker.jobs")

# A checkpoint's adapter download: the PEFT files and the tokenizer with the chat template it was trained with.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")
PROGRESS_WRITE_INTERVAL = 0.5
METRICS_COLUMNS = ("step", "train_loss", "learning_rate", "valid_loss", "valid_mean_token_accuracy")
OOM_ADVICE = ("The job ran out of memory: lower micro_batch_size or max_seq_length, or use quantization 'nf4' "
              "(QLoRA) to hold the base model in 4 bits.")


@dataclass
class ClaimedJob:
    id: str
    project_id: str
    project_name: str
    spec: JobSpec
    training_key: str
    validation_key: str | None
    checkpoint_key: str | None
    checkpoint_step: int
    attempts: int
    placement: dict
    plan: dict | None


def job_prefix(project_id: str, job_id: str) -> str:
    return f"projects/{project_id}/jobs/{job_id}"


class Heartbeat(threading.Thread):
    """Renews the job's lease while training; notices when the lease was lost to the sweep."""

    def __init__(self, settings: Settings, job_id: str, owner: str):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        interval = max(0.5, self.settings.lease_seconds / 3)
        while not self.done.wait(interval):
            try:
                with transaction(self.settings.database_url) as session:
                    if not repo.renew_lease(session, self.job_id, self.owner, self.settings.lease_seconds):
                        self.lost.set()
                        return
            except Exception:  # a database blip: the lease still has time, try again next tick
                log.warning("lease renewal failed", exc_info=True, extra={"job_id": self.job_id})


def claim(settings: Settings, job_id: str, owner: str) -> ClaimedJob | None:
    with transaction(settings.database_url) as session:
        if not repo.claim(session, job_id, owner, settings.lease_seconds):
            return None
        job = repo.get_any(session, job_id)
        project = projects_repo.get_project(session, job.project_id)
        training = files_repo.get_any(session, job.training_file_id)
        validation = files_repo.get_any(session, job.validation_file_id) if job.validation_file_id else None
        stored = repo.checkpoints(session, job_id)
        latest = stored[-1] if stored else None
        if latest:
            dropped = repo.delete_metrics_after(session, job_id, latest.step)
            lifecycle.add_event(session, job, f"Resuming from checkpoint step {latest.step} (attempt {job.attempts}"
                                f"{f'; {dropped} metrics rows after it will be trained again' if dropped else ''})")
        else:
            lifecycle.add_event(session, job, f"Training started (attempt {job.attempts})")
        return ClaimedJob(job.id, job.project_id, project.name, JobSpec.model_validate(job.spec),
                          training.storage_key, validation.storage_key if validation else None,
                          latest.storage_key if latest else None, latest.step if latest else 0, job.attempts,
                          dict(job.placement or {}), job.plan)


class JobRun:
    """The hooks the training core calls, writing progress, metrics, events and checkpoints."""

    def __init__(self, settings: Settings, storage: Storage, job: ClaimedJob, owner: str, heartbeat: Heartbeat,
                 work: Path):
        self.settings, self.storage, self.job, self.owner = settings, storage, job, owner
        self.heartbeat, self.work = heartbeat, work
        self._last_progress_write = 0.0

    def _db(self):
        return transaction(self.settings.database_url)

    def _event(self, message: str, *, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        with self._db() as session:
            job = repo.get_any(session, self.job.id)
            lifecycle.add_event(session, job, message, level=level, type_=type_, data=data)

    def on_progress(self, progress: dict) -> None:
        now = time.time()
        last = progress.get("total_steps") and progress.get("step") == progress.get("total_steps")
        if now - self._last_progress_write < PROGRESS_WRITE_INTERVAL and not last:
            return
        self._last_progress_write = now
        total = progress.get("total_steps") or 0
        step = progress.get("step") or 0
        values = {"progress": {
            "step": step, "total_steps": total or None, "percent": round(100.0 * step / total, 1) if total else 0.0,
            "epoch": progress.get("epoch"), "train_loss": progress.get("loss"),
            "tokens_per_second": progress.get("tokens_per_second")}}
        if progress.get("tokens_seen") is not None:
            values["trained_tokens"] = int(progress["tokens_seen"])
        if progress.get("eta_seconds") is not None:
            values["estimated_finish"] = now + float(progress["eta_seconds"])
        with self._db() as session:
            repo.update_owned(session, self.job.id, self.owner, **values)

    def on_parameters(self, parameters: dict) -> None:
        with self._db() as session:
            repo.update_owned(session, self.job.id, self.owner, parameters=parameters)
        self._event(f"Training {parameters['trainable_parameters']:,} of {parameters['total_parameters']:,} parameters "
                    f"({parameters['trainable_percent']:.4f} %)", data=parameters)

    def on_metrics(self, metrics: dict) -> None:
        step = metrics.get("step")
        parts = [f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and isinstance(v, float)]
        self._event(f"Step {step}: " + ", ".join(parts), type_="metrics", data=metrics)

    def on_event(self, level: str, message: str) -> None:
        self._event(message, level=level if level in ("info", "warn", "error") else "info")

    def should_stop(self) -> bool:
        if self.heartbeat.lost.is_set():
            return True
        with self._db() as session:
            job = repo.get_any(session, self.job.id)
            return job is None or job.cancel_requested or job.lease_owner != self.owner

    def store_archives(self, folder: Path, prefix: str) -> dict:
        """Upload `folder` as .tar.gz and .zip, each verified by checksum after upload."""
        stored = {}
        for fmt in ARCHIVE_FORMATS:
            local = make_archive(folder, self.work / f"upload.{fmt}", fmt)
            stored[fmt] = self.upload_verified(local, f"{prefix}.{fmt}")
        return stored

    def upload_verified(self, local: Path, key: str) -> dict:
        expected = sha256_file(local)
        result = self.storage.put_file(key, local)
        if result.sha256 != expected or self.storage.sha256(key) != expected:
            raise RuntimeError(f"checksum mismatch after uploading {key}")
        local.unlink()
        return {"key": key, "sha256": expected, "bytes": result.size}

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        prefix = f"{job_prefix(self.job.project_id, self.job.id)}/checkpoints/step-{step}"
        state = self.upload_verified(make_archive(path, self.work / "state.tar.gz", "tar.gz"), f"{prefix}/state.tar.gz")
        adapter_only = self.work / f"adapter-step-{step}"
        adapter_only.mkdir()
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                os.link(path / name, adapter_only / name)
        archives = self.store_archives(adapter_only, f"{prefix}/adapter")
        with self._db() as session:
            repo.add(session, Checkpoint(id=new_id("ftckpt"), job_id=self.job.id, step=step, metrics=metrics,
                                         storage_key=state["key"], sha256=state["sha256"], bytes=state["bytes"],
                                         artifacts=archives, created_at=time.time()))
            self._prune_checkpoints(session)

    def _prune_checkpoints(self, session) -> None:
        limit = self.job.spec.save_total_limit
        stored = repo.checkpoints(session, self.job.id)
        for old in stored[: max(0, len(stored) - limit)] if limit else []:
            keys = [old.storage_key] + [entry["key"] for entry in (old.artifacts or {}).values()]
            repo.delete_row(session, old)
            for key in keys:
                self.storage.delete(key)

    def metrics_csv(self) -> bytes:
        with self._db() as session:
            rows = [event.data or {} for event in repo.metrics_events(session, self.job.id)]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r.get("step", 0)):
            writer.writerow(row)
        return out.getvalue().encode()


def run_job(job_id: str) -> None:
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed = claim(settings, job_id, owner)
    if claimed is None:
        log.info("job not claimable (running elsewhere, finished or cancelled); message ignored",
                 extra={"job_id": job_id})
        return
    heartbeat = Heartbeat(settings, job_id, owner)
    heartbeat.start()
    try:
        with tempfile.TemporaryDirectory(prefix=f"lorajobs-{job_id}-") as tmp:
            _train_and_settle(settings, get_storage(settings), claimed, owner, heartbeat, Path(tmp))
    finally:
        heartbeat.done.set()


def _train_and_settle(settings: Settings, storage: Storage, job: ClaimedJob, owner: str, heartbeat: Heartbeat,
                      work: Path) -> None:
    from worker.training import TrainingHooks, train

    run = JobRun(settings, storage, job, owner, heartbeat, work)
    train_path = work / "train.jsonl"
    storage.download_to(job.training_key, train_path)
    valid_path = None
    if job.validation_key:
        valid_path = work / "valid.jsonl"
        storage.download_to(job.validation_key, valid_path)
    resume_from = None
    if job.checkpoint_key:
        storage.download_to(job.checkpoint_key, work / "resume.tar.gz")
        resume_from = unpack_archive(work / "resume.tar.gz", work / f"checkpoint-{job.checkpoint_step}")
    hooks = TrainingHooks(on_progress=run.on_progress, on_metrics=run.on_metrics, on_checkpoint=run.on_checkpoint,
                          on_event=run.on_event, should_stop=run.should_stop, on_parameters=run.on_parameters)
    _reset_peak_memory()
    try:
        result = train(job.spec, train_path, valid_path, work / "out", hooks, models_dir=settings.models_dir,
                       resume_from=resume_from, micro_batch_size=job.placement.get("micro_batch_size"),
                       gradient_checkpointing=job.placement.get("gradient_checkpointing",
                                                                job.spec.gradient_checkpointing))
    except Exception as exc:
        _settle_failure(settings, job, owner, exc)
        return
    _record_peak_memory(settings, job, owner, run)
    if heartbeat.lost.is_set():
        log.warning("lease lost during training; another worker owns the job now", extra={"job_id": job.id})
        return
    if result.status == "cancelled":
        with transaction(settings.database_url) as session:
            _settle_in(session, job, owner, status="cancelled", trained_tokens=result.trained_tokens,
                       message=f"Job cancelled at step {result.steps}; its checkpoints stay downloadable")
        return
    archives = run.store_archives(Path(result.adapter_dir), f"{job_prefix(job.project_id, job.id)}/adapter")
    with transaction(settings.database_url) as session:
        results_file = lifecycle.store_result_file(session, storage, job.project_id,
                                                   filename=f"{job.id}-metrics.csv", data=run.metrics_csv())
        row = repo.get_any(session, job.id)
        data = result.to_dict()
        progress = {**(row.progress or {}), "step": result.steps, "total_steps": result.total_steps, "percent": 100.0}
        _settle_in(session, job, owner, status="succeeded", message="The job has successfully completed",
                   progress=progress,
                   fine_tuned_model=lifecycle.fine_tuned_model_name(row, job.project_name),
                   trained_tokens=result.trained_tokens, result=data, artifacts=archives,
                   adapter_sha256=archives["tar.gz"]["sha256"], result_files=[results_file.id],
                   baseline_eval_loss=(data.get("baseline_eval") or {}).get("loss"),
                   final_eval_loss=(data.get("final_eval") or {}).get("loss"))


def _settle_in(session, job: ClaimedJob, owner: str, *, status: str, message: str, level: str = "info",
               **values) -> bool:
    """Move the job to its next status, only while this worker still owns it."""
    if status in repo.TERMINAL_STATUSES:
        values.setdefault("finished_at", time.time())
    owned = repo.update_owned(session, job.id, owner, status=status, lease_owner=None, estimated_finish=None,
                              **values)
    if owned:
        lifecycle.add_event(session, repo.get_any(session, job.id), message, level=level)
    return owned


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def measured_peak() -> tuple[str, int]:
    """(device, peak bytes): `torch.cuda.max_memory_allocated` on a GPU, else the process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return "cuda", int(torch.cuda.max_memory_allocated())
    return "cpu", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _record_peak_memory(settings: Settings, job: ClaimedJob, owner: str, run: "JobRun") -> None:
    """Record the measured peak next to the plan's prediction for the class that ran, so the planner is checked."""
    device, peak = measured_peak()
    predicted = routing.predicted_peak(job.plan, job.placement, device, peak_device_gib=_device_memory_gib(device))
    placement = {**job.placement, "measured_peak_bytes": peak, "measured_on": device,
                 "predicted_peak_bytes": predicted[1] if predicted else None,
                 "predicted_class": predicted[0] if predicted else None}
    with transaction(settings.database_url) as session:
        repo.update_owned(session, job.id, owner, placement=placement)
    how = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the worker process"
    versus = f"; the plan predicted {predicted[1] / 1024**3:.2f} GiB on {predicted[0]}" if predicted else ""
    run.on_event("info", f"Peak memory measured: {peak / 1024**3:.2f} GiB ({how}){versus}.")


def _device_memory_gib(device: str) -> float | None:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 1024**3
    return None


def _settle_failure(settings: Settings, job: ClaimedJob, owner: str, exc: Exception) -> None:
    """User-fixable errors fail at once with what to change; a GPU out of memory retries smaller or larger;
    others are retried a bounded number of times."""
    if isinstance(exc, LorajobsError) and exc.status_code < 500:
        code, message, retry = exc.code or "invalid_training_input", exc.message, False
    elif type(exc).__name__ == "OutOfMemoryError":
        _settle_out_of_memory(settings, job, owner)
        return
    elif isinstance(exc, MemoryError):
        code, message, retry = "out_of_memory", OOM_ADVICE, False
    else:
        log.exception("training crashed", extra={"job_id": job.id})
        code, message = "training_error", f"Training failed: {type(exc).__name__}: {exc}"[:1000]
        retry = job.attempts < settings.max_attempts
    with transaction(settings.database_url) as session:
        if retry:
            requeued = _settle_in(session, job, owner, status="queued", level="warn",
                                  message=f"{message}; retrying (attempt {job.attempts + 1} of "
                                  f"{settings.max_attempts})", lease_expires_at=time.time() + settings.lease_seconds)
            if requeued:
                name = job.placement.get("queue")
                after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job.id, queue=name))
        else:
            _settle_in(session, job, owner, status="failed", level="error", message=message,
                       error={"code": code, "message": message, "param": None})


def _settle_out_of_memory(settings: Settings, job: ClaimedJob, owner: str) -> None:
    """Torch's out of memory: half the micro-batch from the last checkpoint (twice), then the next larger class,
    then fail; each step is an event, and none spends the job's attempts (docs/planning.md)."""
    with transaction(settings.database_url) as session:
        row = repo.get_any(session, job.id)
        hyper = row.hyperparameters or {}
        placement = job.placement
        micro = placement.get("micro_batch_size") or hyper.get("micro_batch_size") or 1
        accumulation = placement.get("gradient_accumulation_steps") or hyper.get("gradient_accumulation_steps") or 1
        step = routing.after_oom(micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                                 halvings=placement.get("oom_halvings", 0), class_name=placement.get("class"),
                                 classes=routing.configured_classes(settings), plan=job.plan)
        if step.action == "fail":
            advice = " ".join((job.plan or {}).get("advice") or [])
            message = f"{step.message}. {OOM_ADVICE}{f' {advice}' if advice else ''}"
            _settle_in(session, job, owner, status="failed", level="error", message=message,
                       error={"code": "out_of_memory", "message": message, "param": None})
            return
        moved = {}
        if step.action == "move":
            gpu = next(c for c in routing.configured_classes(settings) if c.name == step.class_name)
            moved = {"queue": routing.queue_of(gpu), "class": gpu.name, "oom_halvings": 0}
        placement = {**placement, "micro_batch_size": step.micro_batch_size,
                     "gradient_accumulation_steps": step.gradient_accumulation_steps,
                     "oom_halvings": placement.get("oom_halvings", 0) + 1, **moved,
                     "oom_events": placement.get("oom_events", 0) + 1}
        requeued = _settle_in(session, job, owner, status="queued", level="warn", message=step.message,
                              placement=placement, attempts=max(0, job.attempts - 1),
                              lease_expires_at=time.time() + settings.lease_seconds)
        if requeued:
            name = placement.get("queue")
            after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job.id, queue=name))
