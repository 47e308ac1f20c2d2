"""Typed settings for every part of lorajobs, read from `LORAJOBS_*` environment variables."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "changethis", "secret", "password", "admin", "test"}
PUBLIC_API_KEYS = {"lj-local-dev-key"}  # printed in the README and set by `make run`: anyone knows them
MIN_PRODUCTION_SECRET_BYTES = 32
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class Settings(BaseSettings):
    """Configuration of the API, the worker and the CLI; defaults run the embedded service."""

    model_config = SettingsConfigDict(env_prefix="LORAJOBS_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses placeholder secrets and the embedded defaults' shortcuts."
    )
    data_dir: Path = Field(Path("./var"), description="Folder for the embedded default's database, broker and objects.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; default `sqlite:///<data_dir>/lorajobs.db`. PostgreSQL: `postgresql+psycopg://...`."
    )
    broker_url: str = Field(
        "", description="Celery broker; default Celery's filesystem transport under `<data_dir>/broker`. Production: `redis://...`."
    )
    broker_prefix: str = Field(
        "", description="Prefix of every broker key, so several deployments (or test runs) can share one Redis."
    )
    storage_url: str = Field(
        "", description="`file://PATH` (default `file://<data_dir>/objects`) or `s3://BUCKET[/prefix]`."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS servers (MinIO, SeaweedFS, Ceph).")
    s3_public_endpoint_url: str | None = Field(
        None, description="Address clients use to reach S3, for presigned download URLs (default: the endpoint)."
    )
    s3_region: str = Field("us-east-1", description="S3 region name.")
    models_dir: Path = Field(Path("./var/models"), description="Model catalogue: Hugging Face model folders keyed by id.")
    model_cache_gib: float = Field(
        100.0, gt=0, description="Disk a worker lets models downloaded from the deployment's catalogue take in "
        "`models_dir`; past it the least recently used are deleted (local folders never are)."
    )
    bootstrap_api_key: str | None = Field(
        None, description="When set, start-up ensures a project named `default` with exactly this API key."
    )
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, description="Port the API binds to.")
    api_workers: int = Field(1, ge=1, description="Processes serving the API (`lorajobs api`); about one per core.")
    db_pool_size: int = Field(
        12, ge=1, le=500,
        description="Database connections each API process keeps open, and the requests it runs at once (no overflow).",
    )
    db_pool_timeout: float = Field(
        3.0, gt=0, description="Seconds a request waits for a free connection before answering 503 with Retry-After."
    )
    db_max_connections: int | None = Field(
        None, ge=1,
        description="Connections the server accepts, for the start-up budget check; unset reads PostgreSQL's max_connections.",
    )
    db_reserved_connections: int = Field(
        10, ge=0,
        description="Connections kept free on the server for workers, the sweeper and migrations (start-up budget check).",
    )
    db_connect_timeout: int = Field(
        10, ge=2, description="Seconds a PostgreSQL connection may take to open; past it the request answers 503 "
        "(a worker's write is retried) instead of waiting on a silent network (psycopg alone waits 130 s).",
    )
    db_prepared_statements: bool = Field(
        True, description="Let psycopg prepare the statements it runs often (PostgreSQL). Set false behind PgBouncer "
        "older than 1.21, or without max_prepared_statements, in transaction pooling.",
    )
    secret_key: str = Field(
        "dev-insecure-secret-key", description="Signs dashboard sessions and CSRF tokens; must be set in production."
    )
    api_key_pepper: str = Field(
        "", description="Server-side secret API keys are hashed with (HMAC-SHA256); empty: derived from "
        "`LORAJOBS_SECRET_KEY`. Changing it invalidates every key."
    )
    cookie_secure: bool | None = Field(
        None, description="Mark the dashboard cookie `Secure`; unset: on in production, else when the request is HTTPS."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-Proto/For uvicorn trusts (comma-separated, `*` for any)."
    )
    presign_expiry_seconds: int = Field(
        600, ge=1, le=7 * 86400, description="Lifetime of the presigned download URLs the API redirects to."
    )
    max_json_bytes: int = Field(
        1 << 20, ge=1024, description="Largest JSON or form body any route accepts (bytes); uploads have their own limit."
    )
    max_upload_bytes: int = Field(1 << 30, description="Largest file `POST /v1/files` accepts (bytes).")
    write_retry_seconds: float = Field(
        60.0, ge=0, description="How long a training worker retries a failing database or storage write (a "
        "checkpoint row, the final adapter and result) before giving it up; progress and metrics are kept and "
        "written once the database answers.")
    checkpoint_interval_seconds: float = Field(
        600.0, ge=0, description="A running job also checkpoints after this many seconds of training since its "
        "last checkpoint (0: only by the spec's save_steps or each epoch).")
    watchdog_seconds: float = Field(
        1800.0, ge=0, description="A training attempt that reports no progress (step, evaluation, upload) for this "
        "long is abandoned and its job requeued or failed with `timeout` (0: never).")
    cpu_compute: Literal["auto", "float32", "bf16-autocast", "bfloat16"] = Field(
        "auto", description="How a CPU worker computes: `auto` measures this CPU once per process and takes the "
        "fastest; otherwise plain LoRA uses that path (float32; bf16 autocast over float32 weights; the base in "
        "bfloat16) and QLoRA's 4-bit layers compute in float32, or in bfloat16 for either bf16 choice. A job's "
        "`compute_dtype` still wins for its 4-bit layers.")
    work_dir: Path | None = Field(
        None, description="Folder of the workers' per-job scratch folders (datasets, checkpoints, archives); "
        "unset: the system's temporary folder.")
    work_min_free_bytes: int = Field(
        2 << 30, ge=0, description="Free space a worker's work folder must keep beyond a job's estimated needs, "
        "checked before the job starts (`disk_full`).")
    max_infra_retries: int = Field(
        5, ge=0, description="Times a job is requeued for an infrastructure failure (storage unavailable, a full "
        "disk) before it fails with that code; these retries spend no attempt.")
    rate_limit_requests: int = Field(
        1200, ge=0, description="`/v1` requests one API key may make per rate-limit window (0: no limit); over it: 429."
    )
    rate_limit_uploads: int = Field(
        120, ge=0, description="`POST /v1/files` uploads one API key may make per rate-limit window (0: no limit)."
    )
    rate_limit_window_seconds: int = Field(60, ge=1, description="The rate-limit window (seconds).")
    max_active_jobs_per_project: int = Field(
        20, ge=0, description="Jobs a project may have validating, queued or running at once (0: no limit)."
    )
    max_queued_gpu_hours_per_project: float = Field(
        168.0, ge=0, description="Planned training hours a project may have queued or running at once, from each "
        "job's plan where it has one (0: no limit)."
    )
    max_files_per_project: int = Field(1000, ge=0, description="Files a project may hold (0: no limit).")
    max_file_bytes_per_project: int = Field(
        100 << 30, ge=0, description="Bytes of files a project may hold (0: no limit)."
    )
    max_merged_models_per_project: int = Field(
        10, ge=0, description="Merged full-precision models a project may have stored or being made (0: no limit)."
    )
    lease_seconds: int = Field(120, description="A running job's lease; a worker renews it while training.")
    sweep_interval_seconds: float = Field(15.0, description="How often the sweep looks for expired leases.")
    max_attempts: int = Field(3, description="A job whose worker was lost this many times fails.")
    resend_backoff_max_seconds: float = Field(
        600.0, gt=0, description="Longest wait between two resends of a message no worker took (the wait doubles).")
    validation_resend_seconds: float = Field(
        300.0, gt=0, description="A file still `uploaded` this long after its validation was sent is sent again.")
    merge_resend_seconds: float = Field(
        1800.0, gt=0, description="A merge still pending this long after it was asked for is sent again.")
    gc_grace_seconds: float = Field(
        86400.0, gt=0, description="Age after which an object without a row, an incomplete upload or a dead "
        "worker's folder is garbage.")
    gc_interval_seconds: float = Field(
        3600.0, ge=0, description="How often the sweeper collects garbage (0: only `lorajobs gc`).")
    gpu_classes: str = Field(
        "", description="GPU classes jobs are routed to, `NAME[:MEMORY_GIB[:TFLOPS]],...` (e.g. `gpu-24g,gpu-80g`): "
        "one Celery queue each, a job goes to the smallest that fits it; empty: every job on the `gpu` queue."
    )
    log_level: str = Field("INFO", description="Log level of every part.")
    log_json: bool = Field(True, description="One JSON object per log line.")

    @field_validator("bootstrap_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return value or None  # compose passes an unset variable as ""

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> "Settings":
        data = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(data / 'lorajobs.db').as_posix()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url:
            self.storage_url = f"file://{(data / 'objects').as_posix()}"
        if self.gpu_classes:
            from core.planning.compute import parse_gpu_classes

            parse_gpu_classes(self.gpu_classes)  # a typo fails at start, not at the first job
        if self.environment == "production":
            problems = self.exposure_problems()
            if problems:
                raise ValueError("; ".join(problems) + " (LORAJOBS_ENVIRONMENT=production)")
            if len(self.secret_key.encode()) < MIN_PRODUCTION_SECRET_BYTES:
                raise ValueError(f"LORAJOBS_SECRET_KEY is too short for production "
                                 f"({MIN_PRODUCTION_SECRET_BYTES} bytes at least)")
            if self.api_key_pepper and len(self.api_key_pepper.encode()) < MIN_PRODUCTION_SECRET_BYTES:
                raise ValueError(f"LORAJOBS_API_KEY_PEPPER is too short for production "
                                 f"({MIN_PRODUCTION_SECRET_BYTES} bytes at least)")
            if self.bootstrap_api_key is not None and len(self.bootstrap_api_key) < 20:
                raise ValueError("LORAJOBS_BOOTSTRAP_API_KEY is too short for production (20 characters at least)")
        return self

    def exposure_problems(self) -> list[str]:
        """Why this configuration must not be reachable from other machines: publicly known secrets or keys."""
        problems = []
        if self.secret_key.lower() in PLACEHOLDER_SECRETS or self.secret_key.startswith("dev-"):
            problems.append("LORAJOBS_SECRET_KEY is a placeholder")
        if self.bootstrap_api_key in PUBLIC_API_KEYS:
            problems.append(f"LORAJOBS_BOOTSTRAP_API_KEY is the public key {self.bootstrap_api_key}")
        return problems

    @property
    def secure_cookies(self) -> bool | None:
        """`Secure` on the dashboard cookie: the setting, on in production; None: decide by the request's scheme."""
        return True if self.cookie_secure is None and self.environment == "production" else self.cookie_secure

    @property
    def broker_folder(self) -> Path:
        """Folder of Celery's filesystem transport (embedded default)."""
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
