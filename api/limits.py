"""Per-key rate limits and per-project quotas; both answer 429 `rate_limit_exceeded` with `Retry-After`.

Rate limits count requests in fixed windows of `rate_limit_window_seconds` per API key. Where Redis is the broker
the counters live there (every API process and host shares them); on the embedded default (Celery's filesystem
transport, one API process) they live in the process. A counter store that cannot be reached lets requests through:
a Redis outage must not take the API down with it. Quotas are counted in the database at the moment they matter
(a job created, a file uploaded, a merge asked for), so they hold across processes on every deployment.
"""

import hashlib
import logging
import math
import threading
import time

import redis
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import bearer_key
from core import routing
from core.errors import QuotaExceeded, RateLimited
from core.settings import Settings
from db.models import Job, Project
from db.repositories import files as files_repo
from db.repositories import jobs as jobs_repo

log = logging.getLogger("lorajobs.api.limits")

QUOTA_RETRY_AFTER = 60  # seconds: a hint only; a quota frees when jobs finish or files are deleted
REDIS_TIMEOUT_SECONDS = 0.5


class MemoryCounters:
    """Fixed-window counters in this process (the embedded default runs one API process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (window index, count)

    def hit(self, key: str, window_seconds: int) -> tuple[int, float]:
        """Count one request; returns (requests in the current window, seconds until it ends)."""
        now = time.time()
        index = int(now // window_seconds)
        with self._lock:
            if len(self._windows) > 100_000:  # keys of past windows only; bounded however many keys are used
                self._windows = {k: v for k, v in self._windows.items() if v[0] == index}
            start, count = self._windows.get(key, (index, 0))
            count = count + 1 if start == index else 1
            self._windows[key] = (index, count)
        return count, (index + 1) * window_seconds - now


class RedisCounters:
    """Fixed-window counters in Redis, shared by every API process and host."""

    def __init__(self, url: str, prefix: str):
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                           socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self.prefix = prefix + "lorajobs:ratelimit:"

    def hit(self, key: str, window_seconds: int) -> tuple[int, float]:
        now = time.time()
        index = int(now // window_seconds)
        name = f"{self.prefix}{key}:{index}"
        pipe = self.client.pipeline()
        pipe.incr(name)
        pipe.expire(name, window_seconds + 1)
        count, _ = pipe.execute()
        return int(count), (index + 1) * window_seconds - now


_counters: dict[tuple[str, str], MemoryCounters | RedisCounters] = {}
_counters_lock = threading.Lock()


def counters_for(settings: Settings) -> MemoryCounters | RedisCounters:
    """One counter store per broker: Redis where Redis is the broker, else this process's memory."""
    key = (settings.broker_url, settings.broker_prefix)
    with _counters_lock:
        if key not in _counters:
            redis_broker = settings.broker_url.startswith(("redis://", "rediss://"))
            _counters[key] = RedisCounters(*key) if redis_broker else MemoryCounters()
        return _counters[key]


def check_rate(settings: Settings, api_key: str, bucket: str, limit: int) -> None:
    """Count one request of `bucket` for the key; over `limit` in the window: 429 with the seconds left."""
    if limit <= 0:
        return
    window = settings.rate_limit_window_seconds
    # Keys are never stored, even hashed as the database stores them: a digest of our own names the counter.
    name = f"{bucket}:{hashlib.sha256(api_key.encode()).hexdigest()[:32]}"
    try:
        count, left = counters_for(settings).hit(name, window)
    except redis.RedisError as exc:
        log.warning("rate limit not checked, counter store unavailable: %s", type(exc).__name__)
        return
    if count > limit:
        raise RateLimited(f"Rate limit reached: {limit} {bucket} per {window} s for this API key "
                          f"(LORAJOBS_RATE_LIMIT_{bucket.upper()}); retry after {math.ceil(left)} s.",
                          retry_after=math.ceil(left))


def _count(settings: Settings, api_key: str, buckets: list[tuple[str, int]]) -> None:
    for bucket, limit in buckets:
        check_rate(settings, api_key, bucket, limit)


async def rate_limit(request: Request) -> None:
    """Every `/v1` request of an authenticated key; uploads also count against their own, lower limit.

    On a worker thread only when the counters are in Redis: with rate limits off or counted in this process's memory,
    a request pays no thread hop for them.
    """
    settings: Settings = request.app.state.settings
    buckets = [("requests", settings.rate_limit_requests)]
    if request.method == "POST" and request.url.path.rstrip("/").endswith("/v1/files"):
        buckets.append(("uploads", settings.rate_limit_uploads))
    buckets = [(bucket, limit) for bucket, limit in buckets if limit > 0]
    if not buckets:
        return
    api_key = bearer_key(request) or ""
    if isinstance(counters_for(settings), RedisCounters):
        await run_in_threadpool(_count, settings, api_key, buckets)
    else:
        _count(settings, api_key, buckets)


def _refuse(what: str, setting: str, limit: float, unit: str = "") -> QuotaExceeded:
    shown = f"{limit:,}" if isinstance(limit, int) else f"{limit:,g}"
    return QuotaExceeded(f"Project quota reached: {what} (limit {shown}{unit}, LORAJOBS_{setting.upper()}).",
                         retry_after=QUOTA_RETRY_AFTER)


def hold_project(session: Session, project: Project) -> None:
    """Lock the project's row until the transaction ends, so that counting what it holds and adding one more is one
    step: two requests arriving together cannot both see room for the last job, file or merge (on PostgreSQL; a
    SQLite write transaction already holds the whole database). FOR NO KEY UPDATE: it serializes these checks
    without blocking the rows that merely reference the project (a worker's result files, a new key)."""
    session.execute(select(Project.seq).where(Project.id == project.id).with_for_update(key_share=True))


def check_job_quota(session: Session, settings: Settings, project: Project, plan: dict | None,
                    placement: dict | None) -> None:
    """A new job keeps the project within its active jobs and its queued planned hours (the project held until the
    caller's transaction, which adds the job, ends)."""
    hold_project(session, project)
    active = jobs_repo.active_of_project(session, project.id)
    if settings.max_active_jobs_per_project and len(active) >= settings.max_active_jobs_per_project:
        raise _refuse(f"{len(active)} jobs already validating, queued or running", "max_active_jobs_per_project",
                      settings.max_active_jobs_per_project)
    limit = settings.max_queued_gpu_hours_per_project
    if limit:
        hours = (sum(_remaining_seconds(job) for job in active) +
                 (routing.planned_seconds(plan, placement) or 0.0)) / 3600
        if hours > limit:
            raise _refuse(f"{hours:,.1f} planned training hours queued or running with this job",
                          "max_queued_gpu_hours_per_project", limit, " h")


def _remaining_seconds(job: Job) -> float:
    """Planned time a job still holds: all of it while queued, the rest of it while running."""
    planned = routing.planned_seconds(job.plan, job.placement) or 0.0
    if job.status != "running":
        return planned
    return planned * (1 - ((job.progress or {}).get("percent") or 0.0) / 100)


def check_file_quota(session: Session, settings: Settings, project: Project, size: int = 0) -> None:
    """Room for one more file of `size` bytes: checked before an upload (size 0, not known yet: is there room at
    all) and again after it with the bytes really received, chunked uploads included."""
    count, total = files_repo.usage(session, project.id)
    if settings.max_files_per_project and count >= settings.max_files_per_project:
        raise _refuse(f"the project holds {count:,} files; delete some first", "max_files_per_project",
                      settings.max_files_per_project)
    limit = settings.max_file_bytes_per_project
    if limit and (total >= limit or total + size > limit):
        raise _refuse(f"the project's files would take {total + size:,} bytes; delete some first",
                      "max_file_bytes_per_project", limit, " bytes")


def check_merge_quota(session: Session, settings: Settings, project: Project) -> None:
    """A new merged model keeps the project within its stored (or being made) merged models."""
    hold_project(session, project)
    limit = settings.max_merged_models_per_project
    held = jobs_repo.count_merged(session, project.id)
    if limit and held >= limit:
        raise _refuse(f"{held} merged models stored or being made; delete fine-tuned models you no longer need "
                      "(DELETE /v1/models/{model})", "max_merged_models_per_project", limit)
