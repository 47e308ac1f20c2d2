"""The API app itself: light imports, the error envelope, auth and tenancy, probes, request ids."""

import subprocess
import sys

import httpx
import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def test_importing_the_api_loads_no_training_library():
    code = "import sys, api.main; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def assert_envelope(response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer lj-wrong-key"}, {"Authorization": "Basic abc"}])
def test_a_request_without_a_valid_key_gets_401_in_the_envelope(stack, headers):
    response = httpx.get(stack.v1 + "/files", headers=headers)
    error = assert_envelope(response, 401)
    assert error["type"] == "authentication_error"


def test_a_revoked_key_is_refused(stack, settings, project_key):
    from api.services.projects import revoke_key, VISIBLE_PREFIX_LENGTH
    from db.session import transaction

    headers = {"Authorization": f"Bearer {project_key.key}"}
    assert httpx.get(stack.v1 + "/files", headers=headers).status_code == 200
    with transaction(settings.database_url) as session:
        revoke_key(session, project_key.key[:VISIBLE_PREFIX_LENGTH])
    assert_envelope(httpx.get(stack.v1 + "/files", headers=headers), 401, code="invalid_api_key")


def test_malformed_requests_use_the_envelope_never_detail(http):
    error = assert_envelope(http.post("fine_tuning/jobs", json={"training_file": "file-x"}), 400, param="model")
    assert "model" in error["message"]
    assert_envelope(http.get("files", params={"limit": "many"}), 400, param="limit")
    assert_envelope(http.get("no/such/route"), 404)
    assert_envelope(http.delete("models"), 405)


def test_probes_and_request_ids(stack):
    assert httpx.get(stack.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert ready.headers["x-request-id"].startswith("req_")
    assert httpx.get(stack.url + "/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert httpx.get(stack.url + "/docs").status_code == 200


def test_readyz_names_what_failed(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    broken = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none",
                                         "broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["storage"] == "ok"
    assert body["checks"]["database"] != "ok" and body["checks"]["broker"] != "ok"
    assert "database" in body["error"]["message"] and "broker" in body["error"]["message"]
