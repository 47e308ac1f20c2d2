"""The sweep on the real PostgreSQL: every state has an exit, each row handled once, leases judged by the database.

Tasks the sweep sends go to a broker namespace no worker listens on, so each row stays as the sweep left it.
"""

import threading
import time

import pytest

from api.services import jobs as jobs_service
from db.models import Project
from db.repositories import jobs as jobs_repo
from db.session import transaction
from tests.faults.rows import event_messages, file_row, job_row, make_file, make_job, make_jobs, make_project
from worker.merge import MergeClaim, _set_merged, merge_job
from worker.sweep import sweep

LOST = "The worker was lost (lease expired)"


@pytest.fixture
def quiet(settings):
    return settings.model_copy(update={"broker_prefix": settings.broker_prefix + "nobody:"})


def expired_jobs(settings, n: int) -> list[str]:
    return make_jobs(settings, n, status="running", attempts=1, lease_owner="gone", lease_expires_at=time.time() - 5)


def assert_requeued_once(settings, job_ids: list[str]) -> None:
    for job_id in job_ids:
        row = job_row(settings, job_id)
        assert (row.status, row.lease_owner, row.attempts) == ("queued", None, 1)
        assert sum(m.startswith(LOST) for m in event_messages(settings, job_id)) == 1


def test_two_sweeps_at_once_over_100_expired_rows_requeue_each_once(quiet):
    job_ids = expired_jobs(quiet, 100)
    results, start = [], threading.Barrier(2)

    def run():
        start.wait()
        results.append(sweep(quiet)["requeued"])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and sum(results) >= 100  # other tests' rows may be swept too
    assert_requeued_once(quiet, job_ids)


def test_a_sweep_skips_the_rows_another_sweep_holds_without_waiting(quiet):
    job_ids = expired_jobs(quiet, 100)
    with transaction(quiet.database_url) as held:
        locked = {job.id for job in jobs_repo.expired_leases(held, 40)}
        started = time.monotonic()
        counts = sweep(quiet)
        assert time.monotonic() - started < 10
        assert counts["requeued"] >= 60
    assert len(locked) == 40
    assert {job_id for job_id in job_ids if job_row(quiet, job_id).status == "running"} == locked
    assert sweep(quiet)["requeued"] >= 40
    assert_requeued_once(quiet, job_ids)


@pytest.mark.parametrize("skew", [90.0, -90.0])
def test_a_sweeper_with_a_skewed_clock_judges_leases_by_the_database(quiet, monkeypatch, skew):
    healthy, lost = make_jobs(quiet, 2, status="queued", lease_expires_at=time.time() + 60)
    with transaction(quiet.database_url) as session:
        assert jobs_repo.claim(session, healthy, "alive", quiet.lease_seconds)
        assert jobs_repo.claim(session, lost, "gone", 0.5)
    time.sleep(1)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    sweep(quiet)
    monkeypatch.undo()
    assert job_row(quiet, healthy).status == "running" and job_row(quiet, healthy).lease_owner == "alive"
    assert job_row(quiet, lost).status == "queued"


def test_a_lost_message_is_resent_with_a_doubling_wait_without_spending_attempts(quiet):
    job_id = make_job(quiet, status="queued", lease_expires_at=time.time() - 1)
    waits = []
    for _ in range(3):
        with transaction(quiet.database_url) as session:
            # As if each wait had passed: the next resend is due now.
            jobs_repo.get_any(session, job_id).lease_expires_at = time.time() - 1
        before = time.time()
        assert sweep(quiet)["resent"] >= 1
        waits.append(round(job_row(quiet, job_id).lease_expires_at - before))
        sweep(quiet)
        assert job_row(quiet, job_id).resends == len(waits), "resent before its wait was over"
    row = job_row(quiet, job_id)
    assert waits == [quiet.lease_seconds * 2, quiet.lease_seconds * 4, quiet.lease_seconds * 8]
    assert (row.status, row.resends, row.attempts) == ("queued", 3, 0)


def test_a_cancel_racing_a_sweep_requeue_and_a_claim_ends_cancelled(quiet):
    job_id = expired_jobs(quiet, 1)[0]
    with transaction(quiet.database_url) as session:
        project = session.query(Project).filter_by(id=job_row(quiet, job_id).project_id).one()
        # The API reads the job while it still looks running...
        seen = jobs_service.get(session, project, job_id)
        assert seen.status == "running"
        # ...the sweep requeues it meanwhile...
        assert sweep(quiet)["requeued"] >= 1
        # ...and the API, on what it read, asks the worker to stop; its cancel commits after the requeue.
        assert jobs_service.cancel(session, project, job_id) is seen
    row = job_row(quiet, job_id)
    assert (row.status, row.cancel_requested) == ("queued", True)
    with transaction(quiet.database_url) as session:
        assert not jobs_repo.claim(session, job_id, "worker", quiet.lease_seconds)
    counts = sweep(quiet)
    row = job_row(quiet, job_id)
    assert counts["cancelled"] >= 1 and row.status == "cancelled" and row.finished_at
    assert "Job cancelled (it was back in the queue when the cancel arrived)" in event_messages(quiet, job_id)
    sweep(quiet)
    assert job_row(quiet, job_id).resends == 0


def test_a_job_with_no_deadline_is_due_at_once_rather_than_never(quiet):
    queued = make_job(quiet, status="queued", lease_expires_at=None)
    running = make_job(quiet, status="running", attempts=1, lease_owner="gone", lease_expires_at=None)
    sweep(quiet)
    assert job_row(quiet, queued).resends == 1 and job_row(quiet, queued).lease_expires_at > time.time()
    assert_requeued_once(quiet, [running])


def test_a_job_whose_worker_died_after_a_cancel_ends_cancelled(quiet):
    job_id = expired_jobs(quiet, 1)[0]
    with transaction(quiet.database_url) as session:
        jobs_repo.get_any(session, job_id).cancel_requested = True
    sweep(quiet)
    assert job_row(quiet, job_id).status == "cancelled"


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_job_whose_stored_spec_no_longer_validates_fails_invalid_spec(quiet, state):
    old_spec = {"model": "tiny/llama", "retired_field": 1}
    lease = {"lease_owner": "gone", "attempts": 1} if state == "running" else {}
    job_id = make_job(quiet, status=state, spec=old_spec, lease_expires_at=time.time() - 1, **lease)
    sweep(quiet)
    row = job_row(quiet, job_id)
    assert row.status == "failed" and row.error["code"] == "invalid_spec" and row.error["param"] == "retired_field"
    assert "no longer valid" in row.error["message"]
    sweep(quiet)
    assert (job_row(quiet, job_id).status, job_row(quiet, job_id).resends) == ("failed", 0)


def test_a_claim_that_raises_fails_the_job_once_instead_of_refusing_every_resend(settings):
    from worker.jobs import run_job

    job_id = make_job(settings, status="queued", spec={"model": "tiny/llama", "retired_field": 1},
                      lease_expires_at=time.time() + 60)
    run_job(job_id)  # what the worker's task does with the message
    row = job_row(settings, job_id)
    assert (row.status, row.error["code"], row.attempts) == ("failed", "invalid_spec", 0)
    run_job(job_id)  # a duplicate message finds the job finished
    assert event_messages(settings, job_id).count(row.error["message"]) == 1


def test_a_file_whose_validation_message_was_lost_is_sent_again(quiet):
    project_id = make_project(quiet)
    stuck = make_file(quiet, project_id, status="uploaded",
                      created_at=time.time() - quiet.validation_resend_seconds - 1)
    fresh = make_file(quiet, project_id, status="uploaded", created_at=time.time())
    before = time.time()
    assert sweep(quiet)["files_resent"] >= 1
    row = file_row(quiet, stuck)
    assert row.resends == 1 and row.resend_at - before == pytest.approx(2 * quiet.validation_resend_seconds, abs=2)
    assert file_row(quiet, fresh).resends == 0
    sweep(quiet)
    assert file_row(quiet, stuck).resends == 1


def test_a_merge_whose_message_was_lost_is_sent_again(quiet):
    requested = time.time() - quiet.merge_resend_seconds - 1
    artifacts = {"tar.gz": {"key": "k", "sha256": "0" * 64, "bytes": 1},
                 "merged": {"status": "pending", "requested_at": requested}}
    stuck = make_job(quiet, status="succeeded", artifacts=artifacts)
    fresh = make_job(quiet, status="succeeded", artifacts={**artifacts, "merged": {"status": "pending",
                                                                                    "requested_at": time.time()}})
    assert sweep(quiet)["merges_resent"] >= 1
    merged = job_row(quiet, stuck).artifacts["merged"]
    assert merged["status"] == "pending" and merged["resends"] == 1 and merged["resend_at"] > time.time()
    assert "resends" not in job_row(quiet, fresh).artifacts["merged"]
    sweep(quiet)
    assert job_row(quiet, stuck).artifacts["merged"]["resends"] == 1


def test_a_resent_merge_leaves_one_another_worker_is_running_and_takes_over_a_dead_ones(quiet):
    """The sweep resends a merge still pending after LORAJOBS_MERGE_RESEND_SECONDS; a big merge may still be running."""
    pending = {"status": "pending", "requested_at": time.time() - quiet.merge_resend_seconds - 1}
    artifacts = {"tar.gz": {"key": "projects/none/adapter.tar.gz", "sha256": "0" * 64, "bytes": 1}}
    running = make_job(quiet, status="succeeded", artifacts={**artifacts, "merged": {
        **pending, "claimed_by": "host:1:live", "claimed_until": time.time() + 60}})
    abandoned = make_job(quiet, status="succeeded", artifacts={**artifacts, "merged": {
        **pending, "claimed_by": "host:2:dead", "claimed_until": time.time() - 1}})
    merge_job(running, quiet)
    merge_job(abandoned, quiet)
    # The live worker's merge is left alone: not run a second time, not failed.
    assert job_row(quiet, running).artifacts["merged"] == {**pending, "claimed_by": "host:1:live",
                                                            "claimed_until": pytest.approx(time.time() + 60, abs=5)}
    # The dead worker's is taken over and run (its adapter is not in storage here, so it fails, which asking again
    # retries).
    merged = job_row(quiet, abandoned).artifacts["merged"]
    assert merged["status"] == "failed" and "claimed_by" not in merged


def test_a_merge_whose_claim_lapsed_and_was_taken_over_records_nothing(quiet):
    artifacts = {"tar.gz": {"key": "projects/none/adapter.tar.gz", "sha256": "0" * 64, "bytes": 1}}
    job = make_job(quiet, status="succeeded", artifacts={**artifacts, "merged": {"status": "pending",
                                                                                  "requested_at": time.time()}})
    first = MergeClaim(quiet, job, "host:1:first")
    assert first.take() is not None
    # The first worker's database is out of reach past the lease: its claim lapses and a resent message's worker
    # takes the merge over.
    with transaction(quiet.database_url) as session:
        row = jobs_repo.get_any(session, job, for_update=True)
        row.artifacts = {**row.artifacts, "merged": {**row.artifacts["merged"], "claimed_until": time.time() - 1}}
    second = MergeClaim(quiet, job, "host:2:second")
    assert second.take() is not None
    # The first worker, back, neither renews nor records its outcome over the second's merge.
    with transaction(quiet.database_url) as session:
        assert not first.renew(session)
    assert not _set_merged(quiet.database_url, job, first.owner, {"status": "failed", "message": "late"})
    merged = job_row(quiet, job).artifacts["merged"]
    assert merged["status"] == "pending" and merged["claimed_by"] == "host:2:second"
    assert _set_merged(quiet.database_url, job, second.owner, {"status": "ready", "key": "k", "sha256": "0" * 64,
                                                               "bytes": 1, "finished_at": time.time()})
    assert job_row(quiet, job).artifacts["merged"]["status"] == "ready"


def test_the_sweep_on_the_embedded_sqlite_database(quiet, tmp_path):
    """The embedded default runs the same sweep: the database's clock and the JSON queries work on SQLite too."""
    from db.migrate import upgrade

    embedded = quiet.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'lorajobs.db'}"})
    upgrade(embedded.database_url)
    lost = expired_jobs(embedded, 1)[0]
    cancelled = make_job(embedded, status="queued", cancel_requested=True, lease_expires_at=time.time() + 60)
    merge = make_job(embedded, status="succeeded", artifacts={"merged": {"status": "pending", "requested_at": 0}})
    stuck_file = make_file(embedded, make_project(embedded), status="uploaded", created_at=0)
    sweep(embedded)
    assert_requeued_once(embedded, [lost])
    assert job_row(embedded, cancelled).status == "cancelled"
    assert job_row(embedded, merge).artifacts["merged"]["resends"] == 1
    assert file_row(embedded, stuck_file).resends == 1
