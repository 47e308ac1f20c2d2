"""Every error leaves the API in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

import logging

import sqlalchemy.exc

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
    errors = exc.errors()
    first = errors[0] if errors else {}
    message = "; ".join(_validation_message(e) for e in errors[:5]) or "Invalid request."
    return envelope(422, message, type_="invalid_request_error", param=_param_of(tuple(first.get("loc", ()))),
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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LorajobsError, _lorajobs_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _database_unavailable)  # the pool's wait ran out
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _database_unavailable)  # refused, down, restarting
    app.add_exception_handler(Exception, _unhandled)
