"""A fine-tuning job on a worker: claim it, train it with a renewed lease, store what it makes, settle it.

The database row is the truth (DESIGN.md, decision 2): a duplicate or late message finds the job
claimed and does nothing; a lost worker's job is requeued by the sweep and resumes from the last
checkpoint stored here.
"""

import abc
import csv
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from core import queue, routing
from core.archives import ARCHIVE_FORMATS, make_archive, sha256_file, unpack_archive
from core.errors import InvalidRequest, LorajobsError, ObjectNotFound
from core.ids import new_id
from core.quality import best_checkpoint_index
from core.settings import Settings, get_settings
from core.spec import JobSpec
from core.storage import Storage, get_storage
from db import lifecycle
from db.clock import db_epoch
from db.models import Checkpoint
from db.repositories import files as files_repo
from db.repositories import jobs as repo
from db.repositories import projects as projects_repo
from db.session import after_commit, transaction
from worker.catalogue import ensure_model
from worker.resilience import (SHUTDOWN, STORAGE_ERRORS, Fenced, GracefulSigterm, InfrastructureFailure, check_free_space, disk_full,
                               retry_db, retry_storage, transient_db_error)

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
    dataset_bytes: int
    checkpoint_keys: dict[int, str]  # every stored checkpoint's archive, by step


def new_owner() -> str:
    """Who holds a job's lease or a merge's claim: this host and process, and this attempt."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def job_prefix(project_id: str, job_id: str) -> str:
    return f"projects/{project_id}/jobs/{job_id}"


class Renewal(threading.Thread, metaclass=abc.ABCMeta):
    """Renews a claim (a job's lease, a merge's claim) every third of the lease while the work runs.

    A database blip costs nothing: the claim still has time, renewal is tried again next tick. A claim found lost
    (the sweep took it, another worker holds it) sets `lost` and ends the renewal, as does work that `stalled`.
    """

    what = "claim"

    def __init__(self, settings: Settings, job_id: str, owner: str, name: str):
        super().__init__(daemon=True, name=name)
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.lost = threading.Event()
        self.done = threading.Event()

    @abc.abstractmethod
    def renew(self, session) -> bool:
        """Extend the claim; False when this worker no longer holds it."""

    def stalled(self) -> bool:
        """Whether the work stopped making progress: the claim is then given up (`lost`, then `abandon`)."""
        return False

    def abandon(self) -> None:
        """Give up stalled work, once `lost` is set (so the work's own writes are already fenced)."""

    def run(self) -> None:
        while not self.done.wait(max(0.5, self.settings.lease_seconds / 3)):
            if self.stalled():
                self.lost.set()
                self.abandon()
                return
            try:
                with transaction(self.settings.database_url) as session:
                    if not self.renew(session):
                        self.lost.set()
                        return
            except Exception:  # a database blip: the claim still has time, try again next tick
                log.warning("%s renewal failed", self.what, exc_info=True, extra={"job_id": self.job_id})


class Heartbeat(Renewal):
    """Renews the job's lease while training makes progress; notices when the lease was lost to the sweep.

    Also the watchdog: an attempt that reports no progress for `watchdog_seconds` (a training thread stuck in a
    collective or a socket while the process lives) stops renewing and `on_hang` abandons it, so the job is
    requeued, cancellable, or failed with `timeout`. A stopped process (SIGSTOP) renews nothing: its lease ends and
    the sweep requeues the job; if it runs again, every write it tries is fenced off.
    """

    what = "lease"

    def __init__(self, settings: Settings, job_id: str, owner: str, on_hang=None):
        super().__init__(settings, job_id, owner, name=f"lease-{job_id}")
        self.on_hang = on_hang
        self.last_progress = time.monotonic()

    def alive(self) -> None:
        """Training made progress (a step, an evaluation, a checkpoint stored)."""
        self.last_progress = time.monotonic()

    def stalled(self) -> bool:
        watchdog = self.settings.watchdog_seconds
        return bool(watchdog) and time.monotonic() - self.last_progress > watchdog

    def abandon(self) -> None:
        if self.on_hang:
            self.on_hang()

    def renew(self, session) -> bool:
        return repo.renew_lease(session, self.job_id, self.owner, self.settings.lease_seconds)


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
                          dict(job.placement or {}), job.plan,
                          training.bytes + (validation.bytes if validation else 0),
                          {c.step: c.storage_key for c in stored})


class JobRun:
    """The hooks the training core calls, writing progress, metrics, events and checkpoints.

    Every write is fenced: it happens only while this worker still owns the job (its lease owner, unique to the
    claim and so to the attempt), and object keys carry the attempt, so a worker that lost its lease (the database
    away longer than the lease, a stopped process) never overwrites or adds to what the new owner writes. A
    database that is briefly away costs nothing: events are kept and written once it answers, progress waits for
    the next step, a checkpoint row is retried for `write_retry_seconds`.
    """

    def __init__(self, settings: Settings, storage: Storage, job: ClaimedJob, owner: str, heartbeat: Heartbeat,
                 work: Path):
        self.settings, self.storage, self.job, self.owner = settings, storage, job, owner
        self.heartbeat, self.work = heartbeat, work
        self._last_progress_write = 0.0
        self._pending_events: list[dict] = []
        self.stop_reason: str | None = None  # cancel, pause, shutdown or lease_lost, once training was told to stop
        self.last_checkpoint_step: int | None = None

    def _db(self):
        return transaction(self.settings.database_url)

    def _owned(self, session):
        """The job row, locked, while this worker owns it; Fenced otherwise."""
        job = repo.get_any(session, self.job.id, for_update=True)
        if job is None or job.status != "running" or job.lease_owner != self.owner:
            raise Fenced(f"job {self.job.id} is no longer owned by {self.owner}")
        return job

    def write(self, what: str, write, *, retry: bool = False) -> bool:
        """`write(session, job)` in one fenced transaction. False when fenced off, or when the database is away (after
        `write_retry_seconds` of retries when `retry`): the caller keeps its data or gives the write up."""
        def once():
            with self._db() as session:
                write(session, self._owned(session))

        try:
            if retry:
                retry_db(once, budget_seconds=self.settings.write_retry_seconds, what=what,
                         give_up=self.heartbeat.lost.is_set)
            else:
                once()
            return True
        except Fenced:
            log.warning("lease lost: %s not written; another worker owns the job now", what,
                        extra={"job_id": self.job.id})
            self.heartbeat.lost.set()
            return False
        except Exception as exc:
            if not transient_db_error(exc):
                raise
            log.warning("database unavailable: %s not written yet", what, extra={"job_id": self.job.id})
            return False

    def _event(self, message: str, *, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        self._pending_events.append({"message": message, "level": level, "type_": type_, "data": data,
                                     "created_at": time.time()})
        self.flush_events()

    def flush_events(self, *, retry: bool = False) -> bool:
        """Write the events kept while the database was away, in their order and with their times."""
        if not self._pending_events:
            return True
        pending = list(self._pending_events)

        def write(session, job):
            for event in pending:
                lifecycle.add_event(session, job, **event)

        if self.write(f"{len(pending)} events", write, retry=retry):
            del self._pending_events[:len(pending)]
            return True
        return False

    def on_progress(self, progress: dict) -> None:
        self.heartbeat.alive()
        now = time.time()
        last = progress.get("total_steps") and progress.get("step") == progress.get("total_steps")
        if now - self._last_progress_write < PROGRESS_WRITE_INTERVAL and not last:
            return
        self._last_progress_write = now
        total = progress.get("total_steps") or 0
        step = progress.get("step") or 0
        values = {"progress": {
            **_steps(step, total), "epoch": progress.get("epoch"), "train_loss": progress.get("loss"),
            "tokens_per_second": progress.get("tokens_per_second")}}
        if progress.get("tokens_seen") is not None:
            values["trained_tokens"] = int(progress["tokens_seen"])
        if progress.get("eta_seconds") is not None:
            values["estimated_finish"] = now + float(progress["eta_seconds"])
        # Progress is a snapshot: one the database missed is replaced by the next step's.
        self.write("progress", lambda session, _job: repo.update_owned(session, self.job.id, self.owner, **values))

    def on_parameters(self, parameters: dict) -> None:
        self.heartbeat.alive()
        self.write("parameters", lambda session, _job: repo.update_owned(session, self.job.id, self.owner,
                                                                         parameters=parameters), retry=True)
        self._event(f"Training {parameters['trainable_parameters']:,} of {parameters['total_parameters']:,} parameters "
                    f"({parameters['trainable_percent']:.4f} %)", data=parameters)

    def on_metrics(self, metrics: dict) -> None:
        self.heartbeat.alive()
        step = metrics.get("step")
        parts = [f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and isinstance(v, float)]
        self._event(f"Step {step}: " + ", ".join(parts), type_="metrics", data=metrics)

    def on_event(self, level: str, message: str) -> None:
        self._event(message, level=level if level in ("info", "warn", "error") else "info")

    def should_stop(self) -> str | None:
        """Why training must stop at this step, or None; a database that does not answer lets it go on."""
        self.heartbeat.alive()
        if self.heartbeat.lost.is_set():
            self.stop_reason = "lease_lost"
            return "The lease was lost to another worker"
        if SHUTDOWN.is_set():
            self.stop_reason = "shutdown"
            return "The worker is shutting down"
        try:
            with self._db() as session:
                job = repo.get_any(session, self.job.id)
        except Exception as exc:
            if not transient_db_error(exc):
                raise
            return None
        if job is None or job.status != "running" or job.lease_owner != self.owner:
            self.heartbeat.lost.set()
            self.stop_reason = "lease_lost"
            return "The lease was lost to another worker"
        if job.cancel_requested:
            self.stop_reason = "cancel"
            return "Cancellation requested"
        if job.pause_requested:
            self.stop_reason = "pause"
            return "Pause requested"
        self.flush_events()
        return None

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
        self.heartbeat.alive()
        return {"key": key, "sha256": expected, "bytes": result.size}

    def attempt_prefix(self) -> str:
        """Where this attempt's objects go: a worker that lost the job never writes under the new owner's keys."""
        return f"{job_prefix(self.job.project_id, self.job.id)}/attempt-{self.job.attempts}"

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        if self.heartbeat.lost.is_set():
            return
        prefix = f"{self.attempt_prefix()}/checkpoints/step-{step}"
        try:
            state = self.upload_verified(make_archive(path, self.work / "state.tar.gz", "tar.gz"),
                                         f"{prefix}/state.tar.gz")
            adapter_only = self.work / f"adapter-step-{step}"
            adapter_only.mkdir()
            for name in ADAPTER_FILES:
                if (path / name).is_file():
                    os.link(path / name, adapter_only / name)
            archives = self.store_archives(adapter_only, f"{prefix}/adapter")
        except STORAGE_ERRORS as exc:
            # Training goes on: the next checkpoint tries again, and a crash meanwhile resumes from the last one stored.
            self._event(f"Checkpoint at step {step} could not be stored (object storage failed: "
                        f"{getattr(exc, 'message', exc)}); training goes on", level="warn")
            return
        pruned: list[str] = []

        def write(session, _job):
            repo.add(session, Checkpoint(id=new_id("ftckpt"), job_id=self.job.id, step=step, metrics=metrics,
                                         storage_key=state["key"], sha256=state["sha256"], bytes=state["bytes"],
                                         artifacts=archives, created_at=time.time()))
            pruned[:] = self._prune_checkpoints(session)

        if self.write(f"checkpoint step {step}", write, retry=True):
            self.last_checkpoint_step = step
            keys = pruned
        else:  # fenced off or the database stayed away: the objects have no row and go
            keys = [state["key"]] + [entry["key"] for entry in archives.values()]
        for key in keys:
            try:
                self.storage.delete(key)
            except STORAGE_ERRORS:
                log.warning("could not delete %s; garbage collection removes it", key)

    def _prune_checkpoints(self, session) -> list[str]:
        """Drop the rows of checkpoints older than the spec's newest N, except the best one (the job's adapter may be
        it); their keys, deleted once the rows are gone."""
        limit = self.job.spec.save_total_limit
        stored = repo.checkpoints(session, self.job.id)
        best = best_checkpoint_index([c.metrics or {} for c in stored], self.job.spec.best_checkpoint_metric)
        keys = []
        for old in [c for i, c in enumerate(stored[: max(0, len(stored) - limit)] if limit else []) if i != best]:
            keys += [old.storage_key] + [entry["key"] for entry in (old.artifacts or {}).values()]
            repo.delete_row(session, old)
        return keys

    def metrics_csv(self, session) -> bytes:
        rows = [event.data or {} for event in repo.metrics_events(session, self.job.id)]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r.get("step", 0)):
            writer.writerow(row)
        return out.getvalue().encode()


def run_job(job_id: str) -> None:
    settings = get_settings()
    if SHUTDOWN.is_set():  # this process is stopping: the job stays queued and the sweep sends it again
        log.info("shutting down; job not claimed", extra={"job_id": job_id})
        return
    owner = new_owner()
    try:
        claimed = claim(settings, job_id, owner)
    except SQLAlchemyError:
        raise  # the database is away: the job stays queued and the sweep sends it again
    except Exception as exc:  # it can never be claimed (a stored spec this version rejects): fail it, once
        log.exception("claim failed", extra={"job_id": job_id})
        with transaction(settings.database_url) as session:
            lifecycle.fail_unclaimable(session, job_id, exc)
        return
    if claimed is None:
        log.info("job not claimable (running elsewhere, finished or cancelled); message ignored",
                 extra={"job_id": job_id})
        return
    heartbeat = Heartbeat(settings, job_id, owner, on_hang=lambda: _abandon_hung(settings, claimed, owner))
    heartbeat.start()
    try:
        if settings.work_dir:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
        with GracefulSigterm(), tempfile.TemporaryDirectory(prefix=f"lorajobs-{job_id}-", dir=settings.work_dir) as tmp:
            _train_and_settle(settings, get_storage(settings), claimed, owner, heartbeat, Path(tmp))
    except OSError as exc:  # the work folder itself could not be made or removed (a full disk)
        _settle_failure(settings, claimed, owner, exc)
    finally:
        heartbeat.done.set()


def work_bytes_needed(job: ClaimedJob) -> int:
    """What a job writes in its work folder at most: the datasets (downloaded, then read), the checkpoints the Trainer
    keeps (adapter and two AdamW states in fp32: 12 bytes per trained parameter) plus the one being archived, on a
    resume the one resumed from and the best one fetched with it, and the final adapter with its two archives. The
    base model is read from the catalogue, not copied."""
    trainable = (job.plan or {}).get("trainable_parameters") or 0
    kept = (job.spec.save_total_limit or 2) + 1 + (2 if job.checkpoint_key else 0)
    return 2 * job.dataset_bytes + trainable * (12 * kept + 24 + 12)


def _fetch_best_checkpoint(storage: Storage, settings: Settings, job: ClaimedJob, resume_from: Path,
                           work: Path) -> Path | None:
    """The best checkpoint so far, when the one resumed from is not it: the job delivers it at the end. None when
    there is none or it is gone (the job then delivers its last step's adapter and says so)."""
    from worker.training.best import best_step_to_fetch

    step = best_step_to_fetch(resume_from)
    if step is None or step not in job.checkpoint_keys:
        return None
    archive = work / "best.tar.gz"
    try:
        _download(storage, settings, job.checkpoint_keys[step], archive, f"checkpoint step {step}, the best so far")
    except ObjectNotFound:
        return None
    try:
        return unpack_archive(archive, work / f"best-{step}")
    finally:
        archive.unlink(missing_ok=True)


def _download(storage: Storage, settings: Settings, key: str, path: Path, what: str) -> None:
    retry_storage(lambda: storage.download_to(key, path), budget_seconds=settings.write_retry_seconds,
                  what=f"downloading {what}")


def _train_and_settle(settings: Settings, storage: Storage, job: ClaimedJob, owner: str, heartbeat: Heartbeat,
                      work: Path) -> None:
    run = JobRun(settings, storage, job, owner, heartbeat, work)
    try:
        result = _train(settings, storage, job, run, work)
        if heartbeat.lost.is_set():
            log.warning("lease lost during training; another worker owns the job now", extra={"job_id": job.id})
            return
        if result.status == "cancelled":
            _settle_stopped(settings, job, owner, run, result)
            return
        _record_peak_memory(settings, job, owner, run)
        archives = retry_storage(lambda: run.store_archives(Path(result.adapter_dir), f"{run.attempt_prefix()}/adapter"),
                                 budget_seconds=settings.write_retry_seconds, what="uploading the final adapter")
        run.flush_events(retry=True)  # the metrics CSV reads them
        retry_db(lambda: _settle_succeeded(settings, storage, job, owner, run, result, archives),
                 budget_seconds=settings.write_retry_seconds, what="the job's result")
    except Exception as exc:
        if heartbeat.lost.is_set():
            log.warning("lease lost; the failure is left to the job's new owner", exc_info=True,
                        extra={"job_id": job.id})
            return
        _settle_failure(settings, job, owner, exc, work)


def _train(settings: Settings, storage: Storage, job: ClaimedJob, run: JobRun, work: Path):
    """Check the disk, fetch the datasets and the checkpoint to resume from, and train."""
    from worker.training import TrainingHooks, train

    check_free_space(work, work_bytes_needed(job), settings.work_min_free_bytes)
    train_path = work / "train.jsonl"
    valid_path = work / "valid.jsonl" if job.validation_key else None
    for key, path, param in ((job.training_key, train_path, "training_file"),
                             (job.validation_key, valid_path, "validation_file")):
        if key is None:
            continue
        try:
            _download(storage, settings, key, path, f"the {param.replace('_', ' ')}")
        except ObjectNotFound:
            raise InvalidRequest(f"The {param.replace('_', ' ')}'s bytes are missing from object storage ({key}); "
                                 "upload the file again and create a new job.", param=param,
                                 code="dataset_missing") from None
    resume_from = resume_best = None
    if job.checkpoint_key:
        try:
            _download(storage, settings, job.checkpoint_key, work / "resume.tar.gz", "the checkpoint to resume from")
            resume_from = unpack_archive(work / "resume.tar.gz", work / f"checkpoint-{job.checkpoint_step}")
        except ObjectNotFound:
            run.on_event("warn", f"Checkpoint step {job.checkpoint_step} is missing from object storage; training "
                         "restarts from the start")
    if resume_from is not None:
        resume_best = _fetch_best_checkpoint(storage, settings, job, resume_from, work)
    fetched = ensure_model(settings, storage, job.spec.model)  # the catalogue's model, downloaded once per host
    if fetched:
        run.on_event("info", fetched)
    hooks = TrainingHooks(on_progress=run.on_progress, on_metrics=run.on_metrics, on_checkpoint=run.on_checkpoint,
                          on_event=run.on_event, should_stop=run.should_stop, on_parameters=run.on_parameters)
    _reset_peak_memory()
    return train(job.spec, train_path, valid_path, work / "out", hooks, models_dir=settings.models_dir,
                 resume_from=resume_from, resume_best=resume_best, micro_batch_size=job.placement.get("micro_batch_size"),
                 gradient_checkpointing=job.placement.get("gradient_checkpointing", job.spec.gradient_checkpointing),
                 save_every_seconds=settings.checkpoint_interval_seconds or None)


def _settle_succeeded(settings: Settings, storage: Storage, job: ClaimedJob, owner: str, run: JobRun, result,
                      archives: dict) -> None:
    with transaction(settings.database_url) as session:
        results_file = lifecycle.store_result_file(session, storage, job.project_id,
                                                   filename=f"{job.id}-metrics.csv", data=run.metrics_csv(session))
        result_files = [results_file.id, *_store_answers(session, storage, job, result)]
        row = repo.get_any(session, job.id)
        data = result.to_dict()
        progress = {**(row.progress or {}), "step": result.steps, "total_steps": result.total_steps, "percent": 100.0}
        _settle_in(session, job, owner, status="succeeded", message="The job has successfully completed",
                   progress=progress,
                   fine_tuned_model=lifecycle.fine_tuned_model_name(row, job.project_name),
                   trained_tokens=result.trained_tokens, result=data, artifacts=archives,
                   adapter_sha256=archives["tar.gz"]["sha256"], result_files=result_files,
                   baseline_eval_loss=(data.get("baseline_eval") or {}).get("loss"),
                   final_eval_loss=(data.get("final_eval") or {}).get("loss"))


def _store_answers(session, storage: Storage, job: ClaimedJob, result) -> list[str]:
    """The held-out answers as a result file (JSONL), and their figures on the delivered checkpoint's metrics."""
    if not result.answers:
        return []
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.answers).encode()
    answers_file = lifecycle.store_result_file(session, storage, job.project_id, filename=f"{job.id}-answers.jsonl",
                                               data=data)
    step = (result.best_checkpoint or {}).get("step", result.steps)
    tuned = result.quality["tuned"]
    for checkpoint in repo.checkpoints(session, job.id):
        if checkpoint.step == step:
            checkpoint.metrics = {**(checkpoint.metrics or {}), **{
                key: tuned[key] for key in ("exact_match", "key_facts", "fact_recall") if tuned[key] is not None}}
    return [answers_file.id]


def _settle_stopped(settings: Settings, job: ClaimedJob, owner: str, run: JobRun, result) -> None:
    """Training stopped at a checkpoint: cancelled, paused, or released by a worker shutting down. A pause and a
    release spend no attempt; a cancel asked meanwhile wins over both."""
    run.flush_events(retry=True)
    at = (f"checkpoint step {run.last_checkpoint_step}" if run.last_checkpoint_step is not None
          else f"checkpoint step {job.checkpoint_step}" if job.checkpoint_key else "the start")

    def settle() -> None:
        with transaction(settings.database_url) as session:
            row = repo.get_any(session, job.id)
            if row is None:
                return
            progress = _progress_at_stop(row.progress, result)
            if run.stop_reason == "cancel" or row.cancel_requested:
                _settle_in(session, job, owner, status="cancelled", trained_tokens=result.trained_tokens,
                           progress=progress,
                           message=f"Job cancelled at step {result.steps}; its checkpoints stay downloadable")
            elif run.stop_reason == "pause":
                _settle_in(session, job, owner, status="paused", trained_tokens=result.trained_tokens,
                           progress=progress,
                           attempts=max(0, job.attempts - 1), pause_requested=False, lease_expires_at=None,
                           message=f"Job paused at step {result.steps}; it resumes from {at} "
                                   f"(POST /v1/fine_tuning/jobs/{job.id}/resume)")
            else:
                requeued = _settle_in(session, job, owner, status="queued", level="warn",
                                      attempts=max(0, job.attempts - 1), progress=progress,
                                      lease_expires_at=db_epoch() + settings.lease_seconds,
                                      message=f"The worker is shutting down: job released at step {result.steps}; it "
                                              f"resumes from {at} on the next free worker (no attempt spent)")
                if requeued:
                    name = job.placement.get("queue")
                    after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job.id, queue=name))

    retry_db(settle, budget_seconds=settings.write_retry_seconds, what="the stopped job")


def _progress_at_stop(progress: dict | None, result) -> dict:
    """The job's progress at the step training stopped on. Progress is written at most every few seconds, so the
    last snapshot may be steps behind the checkpoint a pause or a release wrote; the job shows the step it stopped
    on (the one its event names and it resumes from) until it trains again."""
    total = result.total_steps or (progress or {}).get("total_steps") or 0
    return {**(progress or {}), **_steps(result.steps, total)}


def _steps(step: int, total: int) -> dict:
    """A progress's step, total (None while unknown) and percent done."""
    return {"step": step, "total_steps": total or None, "percent": round(100.0 * step / total, 1) if total else 0.0}


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
    run.write("the measured peak", lambda session, _job: repo.update_owned(session, job.id, owner, placement=placement),
              retry=True)
    how = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the worker process"
    versus = f"; the plan predicted {predicted[1] / 1024**3:.2f} GiB on {predicted[0]}" if predicted else ""
    run.on_event("info", f"Peak memory measured: {peak / 1024**3:.2f} GiB ({how}){versus}.")


def _device_memory_gib(device: str) -> float | None:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 1024**3
    return None


def _settle_failure(settings: Settings, job: ClaimedJob, owner: str, exc: Exception, work: Path | None = None) -> None:
    """User-fixable errors fail at once with what to change; a GPU out of memory retries smaller or larger;
    failures of the infrastructure (storage, a full disk) are requeued without spending an attempt; others are
    retried a bounded number of times."""
    param = None
    # torch.save reports a full disk as a RuntimeError with no errno: a failure while the work folder is full is one.
    full = disk_full(exc) or (work is not None and work.exists() and shutil.disk_usage(work).free < FULL_DISK_BYTES)
    if full and not isinstance(exc, InfrastructureFailure):
        exc = InfrastructureFailure("disk_full", f"The worker's disk is full ({exc}); free space on the worker or "
                                    "point LORAJOBS_WORK_DIR at a larger disk.")
    elif isinstance(exc, STORAGE_ERRORS):
        exc = InfrastructureFailure("storage_unavailable", f"Object storage failed: {getattr(exc, 'message', exc)}")
    if isinstance(exc, InfrastructureFailure):
        retry_db(lambda: _settle_infrastructure(settings, job, owner, exc), budget_seconds=settings.write_retry_seconds,
                 what="an infrastructure failure")
        return
    if isinstance(exc, LorajobsError) and exc.status_code < 500:
        code, message, retry, param = exc.code or "invalid_training_input", exc.message, False, exc.param
    elif type(exc).__name__ == "OutOfMemoryError":
        _settle_out_of_memory(settings, job, owner)
        return
    elif isinstance(exc, MemoryError):
        code, message, retry = "out_of_memory", OOM_ADVICE, False
    else:
        log.exception("training crashed", extra={"job_id": job.id})
        code, message = "training_error", f"Training failed: {type(exc).__name__}: {exc}"[:1000]
        retry = job.attempts < settings.max_attempts
    retry_db(lambda: _settle_attempt_failed(settings, job, owner, code, message, retry=retry, param=param),
             budget_seconds=settings.write_retry_seconds, what="the failed attempt")


def _settle_attempt_failed(settings: Settings, job: ClaimedJob, owner: str, code: str, message: str, *, retry: bool,
                           param: str | None = None) -> None:
    """The attempt failed by the job's own doing (its attempt is spent): retry it, or fail the job with `code`."""
    with transaction(settings.database_url) as session:
        if retry:
            requeued = _settle_in(session, job, owner, status="queued", level="warn",
                                  message=f"{message}; retrying (attempt {job.attempts + 1} of "
                                  f"{settings.max_attempts})", lease_expires_at=db_epoch() + settings.lease_seconds)
            if requeued:
                name = job.placement.get("queue")
                after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job.id, queue=name))
        else:
            _settle_in(session, job, owner, status="failed", level="error", message=message,
                       error={"code": code, "message": message, "param": param})


INFRA_RETRY_MAX_DELAY = 600.0
FULL_DISK_BYTES = 1 << 20


def _settle_infrastructure(settings: Settings, job: ClaimedJob, owner: str, failure: InfrastructureFailure) -> None:
    """Requeue without spending an attempt, waiting longer each time (the sweep sends the task when the wait ends,
    docs/operations.md); after `max_infra_retries` fail with the failure's code."""
    retries = job.placement.get("infra_retries", 0)
    with transaction(settings.database_url) as session:
        if retries >= settings.max_infra_retries:
            message = (f"{failure.message} (infrastructure retries: {retries} of {settings.max_infra_retries})"
                       if retries else failure.message)
            _settle_in(session, job, owner, status="failed", level="error", message=message,
                       attempts=max(0, job.attempts - 1), error={"code": failure.code, "message": message, "param": None})
            return
        delay = min(settings.lease_seconds * 2**retries, INFRA_RETRY_MAX_DELAY)
        _settle_in(session, job, owner, status="queued", level="warn", attempts=max(0, job.attempts - 1),
                   placement={**job.placement, "infra_retries": retries + 1},
                   lease_expires_at=db_epoch() + delay,
                   message=f"{failure.message}; requeued, sent again in about {delay:.0f} s "
                           f"(infrastructure retry {retries + 1} of {settings.max_infra_retries}; no attempt spent)")


def _abandon_hung(settings: Settings, job: ClaimedJob, owner: str) -> None:
    """The watchdog's verdict on an attempt that stopped making progress: requeue it (its attempt spent) or fail
    with `timeout`, then end the process, whose stuck thread may hold a GPU; the pool starts a fresh one."""
    message = (f"No training progress for {settings.watchdog_seconds:g} s (LORAJOBS_WATCHDOG_SECONDS): the attempt "
               "was abandoned as hung")
    try:
        retry_db(lambda: _settle_attempt_failed(settings, job, owner, "timeout", message,
                                                retry=job.attempts < settings.max_attempts),
                 budget_seconds=settings.write_retry_seconds, what="the hung attempt")
    except Exception:
        log.exception("could not settle the hung attempt; the sweep requeues it when its lease ends",
                      extra={"job_id": job.id})
    log.error("training hung; ending this process to free what it holds", extra={"job_id": job.id})
    logging.shutdown()
    os._exit(HUNG_EXIT_CODE)


HUNG_EXIT_CODE = 70


def _settle_out_of_memory(settings: Settings, job: ClaimedJob, owner: str) -> None:
    """Torch's out of memory: recompute activations if they were kept, then half the micro-batch from the last
    checkpoint (twice), then the next larger class, then fail; each step is an event, and none spends the job's
    attempts (docs/planning.md)."""
    with transaction(settings.database_url) as session:
        row = repo.get_any(session, job.id)
        hyper = row.hyperparameters or {}
        placement = job.placement
        micro = placement.get("micro_batch_size") or hyper.get("micro_batch_size") or 1
        accumulation = placement.get("gradient_accumulation_steps") or hyper.get("gradient_accumulation_steps") or 1
        step = routing.after_oom(micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                                 halvings=placement.get("oom_halvings", 0), class_name=placement.get("class"),
                                 classes=routing.configured_classes(settings), plan=job.plan,
                                 gradient_checkpointing=placement.get("gradient_checkpointing"),
                                 spec_checkpointing=job.spec.gradient_checkpointing)
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
        if step.gradient_checkpointing is not None:
            moved["gradient_checkpointing"] = step.gradient_checkpointing
        halvings = placement.get("oom_halvings", 0) + (step.action == "halve")
        placement = {**placement, "micro_batch_size": step.micro_batch_size,
                     "gradient_accumulation_steps": step.gradient_accumulation_steps,
                     "oom_halvings": halvings, **moved, "oom_events": placement.get("oom_events", 0) + 1}
        requeued = _settle_in(session, job, owner, status="queued", level="warn", message=step.message,
                              placement=placement, attempts=max(0, job.attempts - 1),
                              lease_expires_at=db_epoch() + settings.lease_seconds)
        if requeued:
            name = placement.get("queue")
            after_commit(session, lambda: queue.send(settings, queue.TRAIN_JOB, job.id, queue=name))
