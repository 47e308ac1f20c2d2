"""Job lifecycle rules on the real database: the sweep, bounded attempts, user-fixable failures."""

import time

import pytest

from core.settings import get_settings
from db.models import File, Job
from db.repositories import files as files_repo
from db.repositories import jobs as jobs_repo
from db.repositories.projects import get_project_by_name
from db.session import transaction
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status


@pytest.fixture
def quiet_broker(settings, monkeypatch):
    """Tasks the sweep sends go to a namespace no worker listens on, so the rows stay as the sweep left them."""
    monkeypatch.setenv("LORAJOBS_BROKER_PREFIX", settings.broker_prefix + "nobody:")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def make_job(settings, **values) -> str:
    """A job row in the given state, as a worker that vanished would have left it."""
    project = make_project_key(settings).project

    file_id = f"file-{time.time_ns()}"
    with transaction(settings.database_url) as session:
        project_id = get_project_by_name(session, project).id
        session.add(File(id=file_id, project_id=project_id, filename="t.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, storage_key="x", status="processed", created_at=time.time()))
        session.flush()
        job = Job(id=f"ftjob-sweep{time.time_ns()}", project_id=project_id, model=TINY_MODEL_ID,
                  training_file_id=file_id, spec={"model": TINY_MODEL_ID}, seed=1, result_files=[],
                  cancel_requested=False, created_at=time.time(), **values)
        session.add(job)
        return job.id


def job_row(settings, job_id: str) -> Job:
    with transaction(settings.database_url) as session:
        return jobs_repo.get_any(session, job_id)


def test_the_sweep_requeues_a_lost_job_then_gives_up_after_the_bounded_attempts(quiet_broker):
    from worker.sweep import sweep

    settings = quiet_broker
    expired = time.time() - 1
    lost = make_job(settings, status="running", attempts=1, lease_owner="gone", lease_expires_at=expired)
    hopeless = make_job(settings, status="running", attempts=settings.max_attempts, lease_owner="gone",
                        lease_expires_at=expired)
    cancelling = make_job(settings, status="running", attempts=1, lease_owner="gone", lease_expires_at=expired)
    with transaction(settings.database_url) as session:
        jobs_repo.get_any(session, cancelling).cancel_requested = True
    healthy = make_job(settings, status="running", attempts=1, lease_owner="alive",
                       lease_expires_at=time.time() + 60)
    unclaimed = make_job(settings, status="queued", attempts=0, lease_expires_at=expired)

    counts = sweep()
    assert counts["requeued"] >= 1 and counts["failed"] >= 1 and counts["cancelled"] >= 1 and counts["resent"] >= 1
    assert job_row(settings, lost).status == "queued" and job_row(settings, lost).lease_owner is None
    failed = job_row(settings, hopeless)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    assert f"lost {settings.max_attempts} times" in failed.error["message"]
    assert job_row(settings, cancelling).status == "cancelled"
    assert job_row(settings, healthy).status == "running"
    assert job_row(settings, unclaimed).lease_expires_at > time.time()


def test_a_user_fixable_error_fails_at_once_with_what_to_change(openai_client):
    training_file = processed_file(openai_client, support_dataset(24))
    job = create_job(openai_client, training_file, max_seq_length=16)
    done = wait_status(openai_client, job.id)
    assert done.status == "failed"
    assert "max_seq_length" in done.error.message and done.error.code
    assert done.model_extra["attempts"] == 1
    assert not [e for e in all_events(openai_client, job.id) if "retrying" in e.message]


def test_a_job_on_a_file_still_being_validated_waits_then_queues_or_fails(quiet_broker):
    from api.schemas_jobs import JobCreate
    from api.services import jobs as jobs_service
    from db import lifecycle

    settings = quiet_broker
    key = make_project_key(settings)
    with transaction(settings.database_url) as session:
        project = get_project_by_name(session, key.project)
        files = []
        for n in range(2):
            row = File(id=f"file-wait{n}{time.time_ns()}", project_id=project.id, filename="t.jsonl",
                       purpose="fine-tune", bytes=1, sha256="0" * 64, storage_key="x", status="uploaded",
                       created_at=time.time())
            session.add(row)
            files.append(row.id)
        session.flush()
        waiting = [jobs_service.create(session, settings, project,
                                       JobCreate(model=TINY_MODEL_ID, training_file=file_id, quantization="none"))
                   for file_id in files]
        assert [job.status for job in waiting] == ["validating_files", "validating_files"]
        job_ids = [job.id for job in waiting]

    with transaction(settings.database_url) as session:
        for file_id, status in zip(files, ("processed", "error")):
            row = files_repo.get_any(session, file_id)
            row.status, row.report = status, {"examples": 24}
            row.status_details = None if status == "processed" else "line 3: invalid_json"
            lifecycle.promote_waiting_jobs(session, settings, row)
    queued, failed = (job_row(settings, job_id) for job_id in job_ids)
    assert queued.status == "queued" and queued.hyperparameters["n_epochs"] >= 1
    assert failed.status == "failed" and failed.error["code"] == "invalid_file"
    assert failed.error["param"] == "training_file" and "invalid_json" in failed.error["message"]
