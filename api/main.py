"""The API app factory: routers under /v1, the error envelope, request ids, structured logs."""

import logging
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request

from api.deps import get_current_project
from api.errors import envelope, install_error_handlers
from api.routes import dashboard, files, health, jobs, models
from core.logging import request_id_var
from core.settings import Settings, get_settings
from core.storage import get_storage

log = logging.getLogger("lorajobs.api")


MULTIPART_OVERHEAD = 64 * 1024


def upload_too_large(request: Request, settings: Settings):
    """Refuse an upload whose declared size is over the limit before reading its body."""
    if request.method != "POST" or request.url.path != "/v1/files":
        return None
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        return envelope(413, f"The file is larger than the {settings.max_upload_bytes:,}-byte limit "
                        "(LORAJOBS_MAX_UPLOAD_BYTES).", type_="invalid_request_error", param="file",
                        code="file_too_large")
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="lorajobs",
        version="0.1.0",
        description="Managed LoRA and QLoRA fine-tuning; a superset of OpenAI's files and fine-tuning API.",
    )
    app.state.settings = settings
    app.state.storage = get_storage(settings)
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id_and_access_log(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or "req_" + uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            response = upload_too_large(request, settings) or await call_next(request)
            response.headers["x-request-id"] = request_id
            log.info("request", extra={"method": request.method, "path": request.url.path,
                                       "status": response.status_code,
                                       "ms": round((time.perf_counter() - started) * 1000, 1)})
            return response
        finally:
            request_id_var.reset(token)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_current_project)])
    v1.include_router(files.router)
    v1.include_router(jobs.router)
    v1.include_router(models.router)
    app.include_router(v1)
    app.include_router(health.router)
    dashboard.install(app)
    return app
