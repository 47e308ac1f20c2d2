"""The dashboard's session cookie and CSRF tokens, signed with HMAC-SHA256 under `settings.secret_key`.

The cookie holds a random nonce and, once signed in, the id of a server-side session (never the key
or its hash): the session and its key are looked up again on every request, so signing out or revoking
the key ends it for good, even for a copy of the cookie. A CSRF token is an HMAC of the nonce, so it is
tied to one session and changes when the person signs in or out.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from api.services.projects import DASHBOARD_SESSION_SECONDS

COOKIE_NAME = "lorajobs_session"
MAX_AGE_SECONDS = DASHBOARD_SESSION_SECONDS


@dataclass(frozen=True)
class DashboardSession:
    nonce: str
    issued_at: int  # whole seconds, as the cookie carries them
    session_id: str | None = None  # a row of dashboard_sessions once signed in

    @property
    def signed_in(self) -> bool:
        return self.session_id is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, purpose: str, message: str) -> str:
    """A MAC bound to its purpose, so a CSRF token can never pass as a cookie signature or the reverse."""
    return _b64(hmac.new(secret.encode(), f"{purpose}|{message}".encode(), hashlib.sha256).digest())


def new_session(session_id: str | None = None) -> DashboardSession:
    """A fresh nonce: signing in or out never keeps the previous session's CSRF token valid."""
    return DashboardSession(nonce=secrets.token_urlsafe(18), issued_at=int(time.time()), session_id=session_id)


def encode(session: DashboardSession, secret: str) -> str:
    payload = {"n": session.nonce, "t": session.issued_at}
    if session.session_id:
        payload["s"] = session.session_id
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_mac(secret, 'session', body)}"


def decode(cookie: str | None, secret: str, now: float | None = None) -> DashboardSession | None:
    """The session in a cookie, or None when it is missing, tampered with, malformed or expired."""
    body, _, signature = (cookie or "").partition(".")
    if not body or not hmac.compare_digest(signature.encode(), _mac(secret, "session", body).encode()):
        return None
    try:
        payload = json.loads(_unb64(body))
        session = DashboardSession(nonce=str(payload["n"]), issued_at=int(payload["t"]), session_id=payload.get("s"))
    except (ValueError, KeyError, TypeError):
        return None
    if (now or time.time()) - session.issued_at > MAX_AGE_SECONDS:
        return None
    return session


def csrf_token(session: DashboardSession, secret: str) -> str:
    return _mac(secret, "csrf", session.nonce)


def csrf_valid(session: DashboardSession | None, secret: str, token: str | None) -> bool:
    return bool(session and token) and hmac.compare_digest(token.encode(), csrf_token(session, secret).encode())
