"""The hot reads: an API key costs one database query per cache period, a key revoked from another process is
refused on the very next request, and job reads answer the same JSON their schema describes, byte for byte the
JSON the whole job row gives though they read only the columns a job object shows."""

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
from api.services import jobs as jobs_service
from api.services.projects import VISIBLE_PREFIX_LENGTH, revoke_key
from db.migrate import upgrade
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


def seed_every_kind(settings, project_name: str) -> list[str]:
    """A job of each kind a user reads, oldest first: succeeded with a whole result (held-out answers, served eval,
    quality, delivered checkpoint), failed, running with an estimate, paused, cancelled, and one waiting for its
    files with a validation file, a suffix and metadata. Floats whose JSON text a re-encoding would change."""
    now = time.time()
    with transaction(settings.database_url) as session:
        project = session.query(Project).filter(Project.name == project_name).one()
        file_id = f"file-all{uuid.uuid4().hex[:12]}"
        session.add(File(id=file_id, project_id=project.id, filename="t.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, storage_key="x", status="processed", created_at=now))
        session.flush()
        spec = {"model": "tiny/llama", "quantization": "nf4", "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                "max_seq_length": 1024, "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto",
                "learning_rate": 0.00020000000000000001, "seed": 7}
        result = {"chat_template": "chatml", "best_checkpoint": {"step": 40, "metric": "valid_loss",
                                                                  "value": 0.7123456789012345, "last_step": 50,
                                                                  "early_stopped": True},
                  "served_eval": {"adapter_on_full_precision_base": {"loss": 0.30000000000000004},
                                  "merged_full_precision": {"loss": 1e-05}, "merged_dequantized_4bit": {"loss": 2.5},
                                  "merge_base": "full_precision"},
                  "quality": {"sample": 2, "answered": 2, "max_new_tokens": 64, "seconds": 12.345678901234567,
                              "base": {"answers": 2, "exact_match": 0.0, "answers_with_facts": 1, "key_facts": 0.0,
                                       "fact_recall": 0.1},
                              "tuned": {"answers": 2, "exact_match": 0.5, "answers_with_facts": 1, "key_facts": 1.0,
                                        "fact_recall": 1.0}},
                  "answers": [{"prompt": f"Colour of parcel {i}?", "expected": "Ünïcode blue", "base": "Red",
                               "tuned": "Ünïcode blue", "base_score": {"exact": False}, "tuned_score": {"exact": True}}
                              for i in range(2)],
                  "library_versions": {"torch": "2.13.0"}, "train_seconds": 31.5}
        common = dict(project_id=project.id, model="tiny/llama", training_file_id=file_id, spec=spec, seed=7,
                      result_files=[], attempts=1, cancel_requested=False,
                      hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1,
                                       "learning_rate": 0.0002},
                      plan={"classes": [{"name": "cpu", "duration_seconds": 600.5}]},
                      placement={"queue": "cpu", "class": "cpu", "micro_batch_size": 4})
        kinds = [
            dict(status="succeeded", result=result, fine_tuned_model="ft:tiny/llama:team::abc", trained_tokens=12345,
                 finished_at=now + 0.9, baseline_eval_loss=2.0000000000000004, final_eval_loss=0.74,
                 adapter_sha256="a" * 64, result_files=["file-metrics", "file-answers"],
                 progress={"step": 50, "total_steps": 50, "percent": 100.0, "epoch": 3.0, "train_loss": 0.5},
                 parameters={"trainable_parameters": 4194304, "total_parameters": 6742609920,
                             "trainable_percent": 0.06220473169624514},
                 artifacts={"tar.gz": {"key": "k", "sha256": "a" * 64, "bytes": 10}}),
            dict(status="failed", error={"code": "out_of_memory", "message": "Out of memory at micro-batch 1",
                                         "param": None}, finished_at=now + 1.5, result={"chat_template": "model"}),
            dict(status="running", estimated_finish=now + 3600.7, lease_owner="gpu0@host", lease_expires_at=now + 60,
                 progress={"step": 3, "total_steps": 50, "percent": 6.0, "tokens_per_second": 118.25}),
            dict(status="paused", pause_requested=False, resends=2),
            dict(status="cancelled", cancel_requested=True, finished_at=now + 2, trained_tokens=99),
            dict(status="validating_files", validation_file_id=file_id, suffix="my-run.v2",
                 user_metadata={"team": "ünïcode", "run": "7"}, hyperparameters=None, plan=None, placement=None,
                 idempotency_key="idem-1", idempotency_hash="b" * 64),
        ]
        ids = []
        for i, kind in enumerate(kinds):
            job_id = f"ftjob-all{uuid.uuid4().hex[:12]}"
            session.add(Job(id=job_id, created_at=now + i, **{**common, **kind}))
            session.flush()
            ids.append(job_id)
    return ids


def whole_row_bytes(settings, project_name: str, job_id: str | None = None, **page) -> bytes:
    """A job object (or a page of them) as built from the whole ORM row, as every job read was before it read only
    the columns the object shows, and as the job writes (create, cancel, pause, resume) still build it."""
    with transaction(settings.database_url) as session:
        project = session.query(Project).filter(Project.name == project_name).one()
        if job_id is not None:
            built = jobs_service.object_with_position(session, jobs_service.get(session, project, job_id), project)
        else:
            rows = jobs_service.page(session, project, **page)
            positions = jobs_service.queue_positions(session, rows.items)
            built = ListResponse.of([jobs_service.to_object(job, project, positions.get(job.id)) for job in rows.items],
                                    rows.has_more)
        return built.model_dump_json(by_alias=True).encode()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_job_reads_answer_the_bytes_the_whole_row_gives(settings, tmp_path, database):
    if database == "sqlite":  # the embedded default: its JSON operators differ from PostgreSQL's
        settings = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'lorajobs.db'}"})
        upgrade(settings.database_url)
    created = make_project_key(settings)
    ids = seed_every_kind(settings, created.project)
    with served(settings) as client:
        headers = {"Authorization": f"Bearer {created.key}"}
        for job_id in ids:
            response = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)
            assert response.status_code == 200, response.text
            assert response.content == whole_row_bytes(settings, created.project, job_id)
        for query, page in [("limit=20", dict(after=None, limit=20)), ("limit=2", dict(after=None, limit=2)),
                            (f"limit=3&after={ids[4]}", dict(after=ids[4], limit=3)),
                            ("status=failed", dict(after=None, limit=20, status="failed")),
                            ("metadata[team]=%C3%BCn%C3%AFcode", dict(after=None, limit=20,
                                                                      metadata={"team": "ünïcode"}))]:
            response = client.get(f"/v1/fine_tuning/jobs?{query}", headers=headers)
            assert response.status_code == 200, response.text
            assert response.content == whole_row_bytes(settings, created.project, **page), query
            assert response.json()["data"], query
        succeeded = client.get(f"/v1/fine_tuning/jobs/{ids[0]}", headers=headers).json()
        assert succeeded["quality"]["tuned"]["key_facts"] == 1.0 and succeeded["chat_template"] == "chatml"
        assert succeeded["served_eval"]["adapter_on_full_precision_base_loss"] == 0.30000000000000004
        assert succeeded["delivered_checkpoint"]["step"] == 40 and "answers" not in succeeded
