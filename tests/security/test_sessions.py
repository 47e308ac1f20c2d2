"""Dashboard sessions: server-side, ended by signing out or revoking the key; the cookie's flags; read-only."""

import os
import re
import subprocess
import sys
import time
import uuid
from http.cookies import SimpleCookie

import httpx
from fastapi.testclient import TestClient

from api.dashboard import session as cookies
from api.main import create_app
from api.services.projects import VISIBLE_PREFIX_LENGTH, create_key, revoke_key
from db.session import transaction
from tests.conftest import make_project_key
from tests.stack import ROOT, free_port


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(client: httpx.Client, key: str) -> httpx.Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"api_key": key, "csrf_token": token, "next": "/jobs"})


def cookie_flags(response) -> dict:
    [header] = [v for k, v in response.headers.multi_items() if k == "set-cookie" and cookies.COOKIE_NAME in v]
    morsel = SimpleCookie(header)[cookies.COOKIE_NAME]
    return {"secure": bool(morsel["secure"]), "httponly": bool(morsel["httponly"]),
            "samesite": morsel["samesite"].lower()}


def test_signing_out_ends_the_session_for_every_copy_of_the_cookie(settings, api_url):
    key = make_project_key(settings).key
    with httpx.Client(base_url=api_url) as browser:
        assert sign_in(browser, key).status_code == 303
        copied = browser.cookies[cookies.COOKIE_NAME]
        page = browser.get("/jobs")
        assert page.status_code == 200
        assert browser.post("/logout", data={"csrf_token": csrf_of(page.text)}).status_code == 303
    with httpx.Client(base_url=api_url, cookies={cookies.COOKIE_NAME: copied}) as stolen:
        response = stolen.get("/jobs")
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
        assert "reason=revoked" in response.headers["location"]
        # A write with the old cookie is turned away before its body is read.
        refused = stolen.post("/files", files={"file": ("a.jsonl", b"{}\n")}, data={"csrf_token": "x"})
        assert refused.status_code == 303 and refused.headers["location"] == "/login"


def test_revoking_the_key_ends_its_sessions(settings, api_url):
    key = make_project_key(settings).key
    with httpx.Client(base_url=api_url) as browser:
        sign_in(browser, key)
        assert browser.get("/jobs").status_code == 200
        with transaction(settings.database_url) as session:
            revoke_key(session, key[:VISIBLE_PREFIX_LENGTH])
        response = browser.get("/jobs")
        assert response.status_code == 303 and "reason=revoked" in response.headers["location"]


def test_a_read_only_key_can_view_the_dashboard_but_not_change_anything(settings, api_url):
    with transaction(settings.database_url) as session:
        key = create_key(session, f"viewer-{uuid.uuid4().hex[:8]}", read_only=True).key
    with httpx.Client(base_url=api_url) as browser:
        assert sign_in(browser, key).status_code == 303
        page = browser.get("/jobs")
        assert page.status_code == 200
        token = csrf_of(page.text)
        for path in ("/jobs/ftjob-x/cancel", "/jobs/new"):
            assert browser.post(path, data={"csrf_token": token}).status_code == 403
        assert browser.post("/files", files={"file": ("a.jsonl", b"{}\n")}, data={"csrf_token": token}).status_code == 403
        assert browser.post("/logout", data={"csrf_token": token}).status_code == 303


def test_the_cookie_is_httponly_lax_and_secure_by_setting(settings):
    for overrides, expected in [({}, False), ({"cookie_secure": True}, True),
                                ({"environment": "production", "secret_key": "s" * 40}, True)]:
        app_settings = settings.model_copy(update=overrides)
        with TestClient(create_app(app_settings), base_url="http://testserver") as client:
            response = client.get("/login")  # the signed-out session's cookie, set over plain HTTP
        assert cookie_flags(response) == {"secure": expected, "httponly": True, "samesite": "lax"}


def test_behind_a_trusted_tls_proxy_the_cookie_is_secure(settings):
    """`lorajobs api` trusts X-Forwarded-Proto from LORAJOBS_FORWARDED_ALLOW_IPS (loopback by default) only."""
    port = free_port()
    env = {**os.environ, "LORAJOBS_LOG_JSON": "false"}
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        assert cookie_flags(httpx.get(url + "/login", headers={"x-forwarded-proto": "https"}))["secure"] is True
        assert cookie_flags(httpx.get(url + "/login"))["secure"] is False
    finally:
        server.terminate()
        server.wait(timeout=20)
