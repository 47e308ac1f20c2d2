"""The hot reads: an API key costs one database query per cache period, a key revoked from another process is
refused on the very next request, and job reads answer the same JSON their schema describes."""

import os
import subprocess
import sys
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from sqlalchemy import event

from api.main import create_app
from api.schemas import ListResponse
from api.schemas_jobs import JobObject
from api.services.projects import VISIBLE_PREFIX_LENGTH, revoke_key
from db.models import File, Job, Project
from db.session import session_factory, transaction
from tests.api.test_app import assert_envelope
from tests.conftest import make_project_key
from tests.stack import ROOT


class KeyQueries:
    """Counts the statements that read `api_keys` on the app's engine."""

    def __init__(self, app):
        self.engine = session_factory(app.state.settings.database_url, app.state.pool).kw["bind"]
        self.count = 0

    def _seen(self, conn, cursor, statement, *args):
        if "FROM api_keys" in statement:
            self.count += 1

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._seen)


def served(settings):
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_a_key_is_looked_up_once_and_then_served_from_the_cache(settings):
    key = make_project_key(settings).key
    headers = {"Authorization": f"Bearer {key}"}
    with served(settings) as client, KeyQueries(client.app) as queries:
        assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
        assert queries.count == 1
        for _ in range(5):
            assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
        assert queries.count == 1
        # A wrong key is never cached: each try is checked (and refused) again.
        for _ in range(2):
            assert_envelope(client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer lj-nope"}), 401,
                            code="invalid_api_key")
        assert queries.count == 3


def test_a_key_revoked_by_lorajobs_keys_revoke_in_another_process_is_refused_at_once(settings):
    key = make_project_key(settings).key
    headers = {"Authorization": f"Bearer {key}"}
    with served(settings) as client, KeyQueries(client.app) as queries:
        for _ in range(3):
            assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
        assert queries.count == 1  # the key is in this process's cache
        done = subprocess.run([sys.executable, "-m", "cli.main", "keys", "revoke", key[:VISIBLE_PREFIX_LENGTH]],
                              cwd=ROOT, env={**os.environ, "LORAJOBS_LOG_JSON": "false"}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "revoked" in done.stdout
        assert_envelope(client.get("/v1/fine_tuning/jobs", headers=headers), 401, code="invalid_api_key")


def test_without_redis_every_request_checks_the_key_and_a_revocation_holds_at_once(settings):
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    key = make_project_key(settings).key
    headers = {"Authorization": f"Bearer {key}"}
    with served(unreachable) as client, KeyQueries(client.app) as queries:
        for _ in range(3):
            assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
        assert queries.count == 3
        with transaction(settings.database_url) as session:
            revoke_key(session, key[:VISIBLE_PREFIX_LENGTH], unreachable)  # its cache bump fails: logged only
        assert_envelope(client.get("/v1/fine_tuning/jobs", headers=headers), 401, code="invalid_api_key")


def seed_jobs(settings, project_name: str) -> list[str]:
    """Three jobs of the project: one succeeded, two queued on a queue of their own, each planned for 600 s."""
    placement = {"queue": f"hot-{uuid.uuid4().hex[:8]}", "class": "cpu"}
    with transaction(settings.database_url) as session:
        project = session.query(Project).filter(Project.name == project_name).one()
        file_id = f"file-hot{uuid.uuid4().hex[:12]}"
        session.add(File(id=file_id, project_id=project.id, filename="t.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, storage_key="x", status="processed", created_at=time.time()))
        session.flush()
        spec = {"model": "tiny/llama", "quantization": "nf4", "lora": {"r": 16}, "max_seq_length": 1024,
                "n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
        ids = []
        for i, status in enumerate(("succeeded", "queued", "queued")):
            job_id = f"ftjob-hot{uuid.uuid4().hex[:12]}"
            session.add(Job(id=job_id, project_id=project.id, model="tiny/llama", training_file_id=file_id,
                            status=status, spec=spec, seed=i, result_files=[], attempts=0, cancel_requested=False,
                            created_at=time.time() + i, user_metadata={"team": "ünïcode"},
                            hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1e-05},
                            progress={"step": 100, "total_steps": 100, "percent": 100.0} if i == 0 else None,
                            plan={"classes": [{"name": "cpu", "duration_seconds": 600.0}]}, placement=placement))
            ids.append(job_id)
    return ids


@pytest.mark.parametrize("path, model", [("/v1/fine_tuning/jobs/{id}", JobObject),
                                          ("/v1/fine_tuning/jobs?limit=20", ListResponse[JobObject])])
def test_job_reads_answer_the_json_their_response_model_serialises(settings, path, model):
    created = make_project_key(settings)
    ids = seed_jobs(settings, created.project)
    before = time.time()
    with served(settings) as client:
        response = client.get(path.format(id=ids[1]), headers={"Authorization": f"Bearer {created.key}"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        # What FastAPI answers for a returned object: validated against the response model, then dumped.
        adapter = TypeAdapter(model)
        assert response.content == adapter.dump_json(adapter.validate_json(response.content), by_alias=True)
        body = response.json()
        job = body if model is JobObject else body["data"][1]
        assert (job["id"], job["status"], job["metadata"]) == (ids[1], "queued", {"team": "ünïcode"})
        assert job["hyperparameters"]["learning_rate_multiplier"] == 1e-05
        # First in its queue: done when its own 600 s are.
        assert job["queue_position"] == 1
        assert before + 600 - 1 <= job["estimated_finish"] <= time.time() + 600 + 1
        if model is not JobObject:
            assert [j["id"] for j in body["data"]] == ids[::-1]
            assert (body["first_id"], body["last_id"], body["has_more"]) == (ids[2], ids[0], False)
            second, done = body["data"][0], body["data"][2]
            assert second["queue_position"] == 2 and second["estimated_finish"] - job["estimated_finish"] in (599, 600, 601)
            assert (done["status"], done["queue_position"], done["estimated_finish"]) == ("succeeded", None, None)
        schema = client.get("/openapi.json").json()["paths"][path.split("?")[0].replace("{id}", "{job_id}")]
        ref = schema["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] == ("JobObject" if model is JobObject else "ListResponse_JobObject_")
