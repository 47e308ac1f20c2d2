"""Every error leaves the API in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

import logging

import sqlalchemy.exc

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import DatabaseBusy, LorajobsError

log = logging.getLogger("lorajobs.api")

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


def envelope(status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
             retry: bool | None = None, extra: dict | None = None) -> JSONResponse:
    headers = {"x-should-retry": "false"} if retry is False else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code, **(extra or {})}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or None


def _validation_message(error: dict) -> str:
    param = _param_of(tuple(error.get("loc", ())))
    message = error.get("msg", "Invalid value")
    return f"{param}: {message}" if param else message


SERVER_ERROR_MESSAGE = "The server had an error while processing your request."
UNAVAILABLE_MESSAGE = "A service the API depends on is unavailable; retry shortly."


def error_response(exc: LorajobsError) -> JSONResponse:
    """The envelope of a domain error. A server error's own text (a database, broker or S3 message) goes to the
    log under the request id, never to the client: the body says only what kind of failure it was."""
    message = exc.message
    if exc.status_code >= 500:
        log.error("server error: %s", exc.message)
        if not isinstance(exc, DatabaseBusy):
            message = UNAVAILABLE_MESSAGE if exc.status_code == 503 else SERVER_ERROR_MESSAGE
    response = envelope(exc.status_code, message, type_=exc.error_type, param=exc.param, code=exc.code,
                        retry=False if not exc.retryable else None, extra=exc.extra)
    if exc.retry_after is not None:
        response.headers["retry-after"] = str(exc.retry_after)
    return response


async def _lorajobs_error(_request: Request, exc: LorajobsError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed request is a 400 `invalid_request_error` naming the parameter, as OpenAI answers (not 422):
    clients that catch the SDK's `BadRequestError` see it."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    message = "; ".join(_validation_message(e) for e in errors[:5]) or "Invalid request."
    return envelope(400, message, type_="invalid_request_error", param=_param_of(tuple(first.get("loc", ()))),
                    code="invalid_request")


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 404 and message == "Not Found":
        message = "Unknown URL; see /docs for the API."
    response = envelope(exc.status_code, message, type_=_HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                        code=message.lower().replace(" ", "_") if exc.status_code == 405 else None)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


BUSY_MESSAGE = "The service is at capacity or its database is briefly unavailable; retry shortly."


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """No connection to be had (pool exhausted, server out of connection slots, server down): retry shortly.

    The `openai` SDK retries a 503 after Retry-After; the driver's text stays in the log, never in the body.
    """
    log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return await _lorajobs_error(request, DatabaseBusy(BUSY_MESSAGE))


async def _unhandled(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return envelope(500, SERVER_ERROR_MESSAGE, type_="server_error", code="internal_error")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `plan` on a job that fits no GPU class

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


ERROR_STATUSES = {400: "Malformed or invalid request", 401: "No valid API key", 403: "Not allowed",
                  404: "No such object in this project", 409: "Conflicts with the object's state",
                  413: "Body over its limit", 429: "Rate limit or project quota reached (see Retry-After)",
                  503: "Briefly unavailable (see Retry-After)"}


def _openapi(app: FastAPI) -> dict:
    """The schema as the API answers: every `/v1` operation may answer the error envelope, and none answers 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components["ErrorDetail"] = ErrorDetail.model_json_schema()
        components["ErrorResponse"] = {**ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"),
                                       "$defs": None}
        del components["ErrorResponse"]["$defs"]
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):
                    for status, description in ERROR_STATUSES.items():
                        responses.setdefault(str(status), {"description": description, "content": content})
        app.openapi_schema = schema
    return app.openapi_schema


def install_error_handlers(app: FastAPI) -> None:
    app.openapi = lambda: _openapi(app)
    app.add_exception_handler(LorajobsError, _lorajobs_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _database_unavailable)  # the pool's wait ran out
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _database_unavailable)  # refused, down, restarting
    app.add_exception_handler(Exception, _unhandled)
