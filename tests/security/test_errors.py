"""Server errors and /readyz say what failed, never the database's, broker's or S3's own text."""

import logging

from fastapi.testclient import TestClient

from api.main import create_app
from tests.conftest import make_project_key

LEAKS = ("127.0.0.1:1", "nobody", "refused", "Errno", "endpoint", "psycopg", "redis://", "lorajobs-test")


def test_readyz_names_the_failed_parts_and_nothing_more(settings, caplog):
    broken = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none",
                                         "broker_url": "redis://127.0.0.1:1/0",
                                         "s3_endpoint_url": "http://127.0.0.1:1"})
    with caplog.at_level(logging.WARNING, logger="lorajobs.api"), TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "unavailable", "broker": "unavailable", "storage": "unavailable"}
    assert body["error"]["code"] == "not_ready"
    assert not [leak for leak in LEAKS if leak in response.text]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "not ready: database" in logged and "127.0.0.1:1" in logged  # the operator still learns why


def test_a_storage_failure_is_a_generic_500_with_the_details_in_the_log(settings, caplog):
    key = make_project_key(settings).key
    broken = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:1"})
    with caplog.at_level(logging.ERROR, logger="lorajobs.api"), TestClient(create_app(broken)) as client:
        response = client.post("/v1/files", headers={"Authorization": f"Bearer {key}", "x-request-id": "req-leak"},
                               files={"file": ("a.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
                               data={"purpose": "fine-tune"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["message"] == "The server had an error while processing your request."
    assert (error["type"], error["code"]) == ("server_error", "storage_error")
    assert response.headers["x-request-id"] == "req-leak"
    assert not [leak for leak in LEAKS if leak in response.text]
    assert any("127.0.0.1:1" in record.getMessage() for record in caplog.records)
