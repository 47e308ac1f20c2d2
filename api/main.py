"""The API app factory: routers under /v1, the error envelope, request ids, structured logs."""

import logging
import time
import uuid
import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.datastructures import Headers, MutableHeaders

from api.deps import get_current_project
from api.errors import install_error_handlers
from api.gate import Gate
from api.limits import rate_limit
from api.routes import dashboard, files, health, jobs, metrics, models
from api.services.metrics import observe_request
from core.logging import configure_logging, request_id_var
from core.settings import Settings, get_settings
from core.storage import get_storage
from db.session import ConnectOptions, PoolConfig

log = logging.getLogger("lorajobs.api")


class RequestContext:
    """Around everything else: the request id (taken from `x-request-id` or made), the access log and the request's
    latency metric (api/services/metrics.py), refusals by the gate (api/gate.py) included.

    One plain ASGI middleware for all three: Starlette's `BaseHTTPMiddleware` costs a task and a stream per request,
    and each middleware layer its own wrapper of `send` and its own clock.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = Headers(scope=scope).get("x-request-id") or "req_" + uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            observe_request(scope, status, seconds)
            if log.isEnabledFor(logging.INFO):
                log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                           "ms": round(seconds * 1000, 1)})
            request_id_var.reset(token)


THREADS_BEYOND_POOL = 8  # worker threads for requests that hold no database slot (uploads, storage, the gate)


def connection_budget(settings: Settings):
    """A lifespan that gives the process `db_pool_size` database slots (api/deps.py `database_slot`), and at least
    as many worker threads plus some: a request holding a slot needs a thread to use its connection. With fewer
    threads than slots (a pool above anyio's default 40, as behind PgBouncer), requests that held threads while
    they waited for a server connection starved those that held one, and the process stalled."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.db_pool_size + THREADS_BEYOND_POOL)
        app.state.db_slots = asyncio.Semaphore(settings.db_pool_size)
        yield

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="lorajobs",
        version="0.1.0",
        description="Managed LoRA and QLoRA fine-tuning; a superset of OpenAI's files and fine-tuning API.",
        lifespan=connection_budget(settings),
    )
    app.state.settings = settings
    # How connections open comes from these settings too, not only from the environment's.
    app.state.pool = PoolConfig(settings.db_pool_size, settings.db_pool_timeout, ConnectOptions.from_settings(settings))
    app.state.storage = get_storage(settings)
    install_error_handlers(app)

    app.add_middleware(Gate, settings=settings)  # added first: it runs inside RequestContext
    app.add_middleware(RequestContext)  # outermost: ids, logs and times the whole answer, the gate's refusals included

    # The rate limit counts a key's requests once the key is known to be valid. Each resource's router is included
    # under /v1 directly: a /v1 router around them would be one more level of route matching per request.
    for router in (files.router, jobs.router, models.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(get_current_project), Depends(rate_limit)])
    app.include_router(health.router)
    app.include_router(metrics.router)
    dashboard.install(app)
    return app


def create_served_app() -> FastAPI:
    """The factory each `lorajobs api --workers N` process builds: logging configured, then the app."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
