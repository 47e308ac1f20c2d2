"""Tenancy: every id-bearing route, API and dashboard, answers another project's ids exactly as ids that do not
exist (404), cursors included, and touches nothing of the other project."""

import re

import httpx
import pytest

from api.routes import dashboard
from tests.api.conftest import csrf_of, dashboard_client
from tests.conftest import make_project_key
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset

MISSING = {"file_id": "file-doesnotexist0000000000", "job_id": "ftjob-doesnotexist000000000",
           "model_id": "ft:tiny/llama:nobody::ftjob-doesnotexist000000000"}


@pytest.fixture(scope="module")
def theirs(trained):
    """Project A's ids: a processed file, a succeeded job with checkpoints and events, its fine-tuned model."""
    client = trained.client
    checkpoints = client.fine_tuning.jobs.checkpoints.list(trained.job.id).data
    events = client.fine_tuning.jobs.list_events(trained.job.id).data
    assert checkpoints and events
    return {"file_id": trained.file_id, "job_id": trained.job.id, "model_id": trained.job.fine_tuned_model,
            "checkpoint_id": checkpoints[0].id, "event_id": events[0].id}


@pytest.fixture(scope="module")
def mine(stack, settings):
    """Project B: its own key, file and (cancelled) job, so lists and cursors have something of B's to page."""
    import openai

    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=60)
    file_id = processed_file(client, support_dataset(12))
    job = create_job(client, file_id, hyperparameters={"n_epochs": 40, "batch_size": 1})
    client.fine_tuning.jobs.cancel(job.id)
    return {"key": key, "file_id": file_id, "job_id": job.id}


def fill(path: str, ids: dict) -> str:
    return re.sub(r"\{(\w+)(?::path)?\}", lambda m: ids[m.group(1)], path)


def id_routes(stack) -> list[tuple[str, str]]:
    schema = httpx.get(stack.url + "/openapi.json").json()
    return [(method.upper(), path) for path, operations in schema["paths"].items() if "{" in path
            for method in operations]


def test_every_api_route_answers_another_projects_ids_as_missing(stack, trained, theirs, mine):
    routes = id_routes(stack)
    assert {("DELETE", "/v1/files/{file_id}"), ("DELETE", "/v1/models/{model_id}"),
            ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints")} <= set(routes)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {mine['key']}"}, timeout=30) as b:
        for method, path in routes:
            other = b.request(method, fill(path, theirs))
            missing = b.request(method, fill(path, MISSING))
            assert other.status_code == missing.status_code == 404, (method, path, other.text)
            assert other.json()["error"]["code"] == missing.json()["error"]["code"], (method, path)
    # Nothing of A's was touched by B's deletes and cancels.
    assert trained.client.files.retrieve(theirs["file_id"]).id == theirs["file_id"]
    assert trained.client.models.retrieve(theirs["model_id"]).id == theirs["model_id"]
    assert trained.client.fine_tuning.jobs.retrieve(theirs["job_id"]).status == "succeeded"


@pytest.mark.parametrize("path, cursor", [
    ("/v1/files", "file_id"),
    ("/v1/fine_tuning/jobs", "job_id"),
    ("/v1/fine_tuning/jobs?status=cancelled", "job_id"),
    ("/v1/fine_tuning/jobs/{mine}/events", "event_id"),
    ("/v1/fine_tuning/jobs/{mine}/checkpoints", "checkpoint_id"),
    ("/v1/fine_tuning/jobs/{mine}/adapter?redirect=false&checkpoint=", "checkpoint_id"),
])
def test_a_cursor_of_another_project_is_404_like_a_missing_one(stack, theirs, mine, path, cursor):
    path = path.replace("{mine}", mine["job_id"])
    separator = "" if path.endswith("=") else ("&after=" if "?" in path else "?after=")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {mine['key']}"}, timeout=30) as b:
        other = b.get(path + separator + theirs[cursor])
        missing = b.get(path + separator + theirs[cursor][:-4] + "zzzz")
    assert other.status_code == missing.status_code == 404, other.text
    assert other.json()["error"] == {**missing.json()["error"], "message": other.json()["error"]["message"]}


def test_every_dashboard_route_answers_another_projects_ids_as_missing(stack, theirs, mine):
    routes = [(method, route.path) for route in dashboard.router.routes if "{" in route.path
              for method in sorted(route.methods - {"HEAD"})]
    assert ("GET", "/jobs/{job_id}") in routes and ("GET", "/files/{file_id}") in routes
    b = dashboard_client(stack.url, mine["key"])
    try:
        token = csrf_of(b)
        for method, path in routes:
            data = {"csrf_token": token} if method == "POST" else None
            other = b.request(method, fill(path, theirs), data=data)
            missing = b.request(method, fill(path, MISSING), data=data)
            assert other.status_code == missing.status_code == 404, (method, path, other.status_code)
        for path in ("/jobs?after=", f"{dashboard.POLL_PREFIX}/jobs?after="):
            other, missing = b.get(path + theirs["job_id"]), b.get(path + MISSING["job_id"])
            assert other.status_code == missing.status_code == 404, (path, other.status_code)
        assert mine["job_id"] in b.get("/jobs").text and theirs["job_id"] not in b.get("/jobs").text
    finally:
        b.close()
