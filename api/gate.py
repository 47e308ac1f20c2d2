"""The gate in front of the app: no work before authentication, and no body read past its route's limit.

FastAPI reads (and spools) a whole body before any dependency runs, so neither the `/v1` key check nor a
size check in a handler can stop a client from making the server read and store what it sends. The gate
runs first, from the headers alone:

1. `/v1` needs an active API key (401 otherwise) and, for a read-only key, a read (403 on writes); a
   dashboard write other than signing in or out needs a live signed-in session (a redirect to sign in
   otherwise, 403 for a read-only key). These refusals read nothing of the body and close the connection.
2. Every body is counted as it arrives, chunked ones included, against its route's limit: uploads
   (`POST /v1/files`, the dashboard's `POST /files`) `LORAJOBS_MAX_UPLOAD_BYTES` plus the multipart
   framing, everything else `LORAJOBS_MAX_JSON_BYTES`. A declared length over it is refused at once; a
   body that grows over it is cut there and answered 413, whatever the app was doing with it. What the
   multipart parser had spooled is an anonymous temporary file, gone when the request ends, and nothing
   reaches storage: the upload handler only runs once the whole form is in.
"""

import logging

import sqlalchemy.exc
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from api.dashboard import session as cookies
from api.dashboard.auth import signed_in_caller
from api.deps import bearer_key, in_transaction
from api.errors import BUSY_MESSAGE, error_response
from api.services import key_cache
from api.services.projects import Caller, authenticate, hash_key
from core.errors import DatabaseBusy, LorajobsError, PayloadTooLarge, PermissionDenied
from core.settings import Settings

log = logging.getLogger("lorajobs.api")

MULTIPART_OVERHEAD = 64 * 1024  # the form's boundaries, part headers and `purpose` field around the file
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UPLOAD_ROUTES = frozenset({("POST", "/v1/files"), ("POST", "/files")})
DASHBOARD_OPEN_WRITES = frozenset({"/login", "/logout"})  # each checks its CSRF token; logout needs no live session
CLOSE = {"connection": "close"}  # the unread body is not drained: the client must open a new connection


class BodyLimitExceeded(Exception):
    """Raised into the app's `receive` when the body grows past its route's limit."""


def body_limit(method: str, path: str, settings: Settings) -> tuple[int, str]:
    """The most body bytes a request may send, and the setting that says so."""
    if (method, path.rstrip("/") or "/") in UPLOAD_ROUTES:
        return settings.max_upload_bytes + MULTIPART_OVERHEAD, "LORAJOBS_MAX_UPLOAD_BYTES"
    return settings.max_json_bytes, "LORAJOBS_MAX_JSON_BYTES"


def refusal(exc: LorajobsError) -> Response:
    """The error's envelope, closing the connection: the body it came with is never read."""
    response = error_response(exc)
    response.headers.update(CLOSE)
    return response


def too_large(limit: int, setting: str, *, upload: bool) -> Response:
    if upload:
        return refusal(PayloadTooLarge(f"The file is larger than the upload limit ({setting}).", param="file"))
    return refusal(PayloadTooLarge(f"The request body is larger than {limit:,} bytes ({setting}).",
                                   code="request_too_large"))


def is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Gate:
    """A plain ASGI middleware, inside RequestContext (so refusals carry a request id and are logged)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        limit, setting = body_limit(method, path, self.settings)
        upload = setting == "LORAJOBS_MAX_UPLOAD_BYTES"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(limit, setting, upload=upload)(scope, receive, send)
        try:
            refused = await self._authorise(scope)
        except LorajobsError as exc:  # a 401, a 403, or no database slot in time (503 with Retry-After)
            refused = refusal(exc)
        except (sqlalchemy.exc.TimeoutError, sqlalchemy.exc.OperationalError) as exc:  # pool empty, database away
            log.warning("database unavailable: %s", type(exc).__name__)
            refused = refusal(DatabaseBusy(BUSY_MESSAGE))
        if refused is not None:
            return await refused(scope, receive, send)
        await self._counted(scope, receive, send, limit, setting, upload)

    async def _authorise(self, scope) -> Response | None:
        """A refusal made from the headers alone, or None; the `/v1` caller is left in the request's state."""
        method, path = scope["method"], scope["path"]
        request = Request(scope)
        if is_api(path):
            caller = await self._api_caller(scope, bearer_key(request))
            if caller.read_only and method not in READ_METHODS:
                raise PermissionDenied("This API key is read-only: it can list and retrieve, not create, change "
                                       "or delete.")
            scope.setdefault("state", {})["caller"] = caller
            return None
        if method in READ_METHODS or path in DASHBOARD_OPEN_WRITES:
            return None
        cookie = cookies.decode(request.cookies.get(cookies.COOKIE_NAME), self.settings.secret_key)
        caller = await self._in_database(scope, signed_in_caller, cookie) if cookie else None
        if caller is None:
            return RedirectResponse("/login", status_code=303, headers=CLOSE)
        if caller.read_only:
            return PlainTextResponse("This dashboard is signed in with a read-only API key: it can view, not change.",
                                     status_code=403, headers=CLOSE)
        return None

    async def _api_caller(self, scope, key: str | None) -> Caller:
        """The key's caller; a key authenticated lately is taken from the cache (api/services/key_cache.py)."""
        cache = key_cache.for_settings(self.settings)
        if cache is None or not key:
            return await self._in_database(scope, authenticate, key, self.settings)
        return await cache.caller(hash_key(key, self.settings),
                                  lambda: self._in_database(scope, authenticate, key, self.settings))

    async def _in_database(self, scope, function, *args) -> Caller | None:
        """`function(session, *args)` in a short transaction of its own, on one of the process's database slots."""
        return await in_transaction(scope["app"], function, *args)

    async def _counted(self, scope, receive, send, limit: int, setting: str, upload: bool) -> None:
        received, exceeded, started = 0, False, False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyLimitExceeded()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body cut short (a 400 "error parsing the body") becomes the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            log.info("body over its limit", extra={"limit": limit, "received": received})
            await too_large(limit, setting, upload=upload)(scope, receive, send)
