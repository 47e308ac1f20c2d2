"""Tables of lorajobs. Every public object has a prefixed string id; `seq` orders and pages rows."""

from typing import Any

from sqlalchemy import false
from sqlalchemy import JSON, BigInteger, Boolean, Double, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT identity on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
SeqType = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class ApiKey(Base):
    __tablename__ = "api_keys"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[float] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double)  # updated at most once a minute
    revoked_at: Mapped[float | None] = mapped_column(Double)
    # `hmac-sha256` under the server's pepper; `sha256`: a key made before the pepper, rehashed when next used.
    hash_scheme: Mapped[str] = mapped_column(String(16), default="hmac-sha256", server_default="sha256")
    read_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class DashboardSession(Base):
    """A signed-in dashboard session: the cookie names it, signing out (or revoking the key) ends it here."""

    __tablename__ = "dashboard_sessions"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    revoked_at: Mapped[float | None] = mapped_column(Double)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_seq", "project_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(20), index=True)
    status_details: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)
    # `expires_after` at upload (OpenAI): past it the file reads as deleted and is purged.
    expires_at: Mapped[float | None] = mapped_column(Double)
    # Deleted while a job's history names it: the bytes are gone, the row keeps the id the job rows point to.
    deleted_at: Mapped[float | None] = mapped_column(Double)
    # Validation messages the sweep sent again (lost by the broker), and when it sends the next one if still uploaded.
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    resend_at: Mapped[float | None] = mapped_column(Double)


class Job(Base):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        Index("ix_jobs_project_seq", "project_id", "seq"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_idempotency_key"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(255))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    status: Mapped[str] = mapped_column(String(20))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # sha256 of the create body the key was first used with: the same key with another body is a 409.
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    # `DELETE /v1/models/{id}`: adapter, merged model and checkpoints removed; the job's history stays.
    model_deleted_at: Mapped[float | None] = mapped_column(Double)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    baseline_eval_loss: Mapped[float | None] = mapped_column(Double)
    final_eval_loss: Mapped[float | None] = mapped_column(Double)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    # As PEFT counts them once the adapter is attached: trainable_parameters, total_parameters, trainable_percent.
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The pre-flight plan (`fine_tuning.job.plan`, core/planning) as it stood when the job was queued.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Where it trains (core/routing.py): queue, class, micro-batch, checkpointing, OOM halvings, measured peak.
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Downloadable archives by format: {"tar.gz": {"key", "sha256", "bytes"}, "zip": {...}}.
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Messages the sweep sent again because no worker claimed the job by its deadline: never spends attempts.
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # `POST .../pause` on a running job: its worker stops at the next step with a checkpoint and the job is `paused`.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    # While running: the lease. While queued: when the sweep resends the task if no worker has claimed it.
    lease_expires_at: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    estimated_finish: Mapped[float | None] = mapped_column(Double)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(10))
    type: Mapped[str] = mapped_column(String(20))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_job_seq", "job_id", "seq"),
        UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)


class Worker(Base):
    """A running worker process, as its last heartbeat described it (worker/heartbeat.py)."""

    __tablename__ = "workers"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(255), unique=True)  # the Celery node name, e.g. gpu0@host
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[Any]] = mapped_column(JSON)
    concurrency: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Double)
    # By the database's clock (db/clock.py), so hosts whose clocks disagree agree on who is live.
    last_seen_at: Mapped[float] = mapped_column(Double, index=True)


class CatalogueEntry(Base):
    """A base model of the deployment's catalogue: its config for the API, its files in object storage (db/catalogue.py)."""

    __tablename__ = "catalogue_models"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(255), unique=True)  # ORG/NAME, as jobs name it
    architecture: Mapped[str | None] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # config.json: the API plans from it, no file needed
    provenance: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(512))  # `upload`, or `hub:ORG/NAME@revision`
    # [{"path", "sha256", "bytes"}]: each file is the object `catalogue/blobs/<sha256>`.
    files: Mapped[list[Any]] = mapped_column(JSON)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Double)
