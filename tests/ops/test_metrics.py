"""A job queued where no worker listens says so (its events, its plan, /readyz, /metrics); once a worker of its class
starts, it trains, and /metrics counts it: scraped and parsed as Prometheus would."""

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_OUTPUT, make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status
from tests.stack import ApiServer, WorkerProcess

CLASS = "gpu-ops"


@pytest.fixture
def ops_stack(settings):
    """An API routing to a class nobody serves yet, with a broker namespace of its own and a dataset worker."""
    mine = settings.model_copy(update={"broker_prefix": settings.broker_prefix + "ops:", "gpu_classes": f"{CLASS}:40"})
    (TEST_OUTPUT / "logs").mkdir(parents=True, exist_ok=True)
    api = ApiServer(mine).start()
    cpu = WorkerProcess(mine, "cpu", TEST_OUTPUT / "logs" / "ops-worker-cpu.log").start()
    yield mine, api
    cpu.stop()
    api.stop()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    answer = httpx.get(url + "/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def readyz_queue(url: str) -> tuple[dict, list[str]]:
    """This class's queue on /readyz and the warnings about it (other tests leave jobs on queues of their own)."""
    body = httpx.get(url + "/readyz", timeout=30).json()
    return body["queues"][CLASS], [w for w in body.get("warnings", []) if CLASS in w]


def test_a_job_with_no_live_worker_says_so_and_metrics_follow_it_to_the_end(ops_stack):
    settings, api = ops_stack
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key.key, max_retries=0)
    job = create_job(client, processed_file(client, support_dataset(16)), hyperparameters={"n_epochs": 1,
                                                                                           "batch_size": 4})
    assert job.status == "queued" and job.model_extra["placement"]["queue"] == CLASS
    unserved = f"No live worker serves {CLASS} (queue {CLASS}): the job waits until one starts."
    warning = next(e for e in all_events(client, job.id) if e.message.startswith(unserved))
    assert warning.level == "warn" and warning.data == {"code": "no_live_worker", "queue": CLASS}
    assert any(note.startswith(unserved) for note in job.model_extra["plan"]["notes"])
    queue, warnings = readyz_queue(api.url)
    assert queue == {"queued": 1, "workers": 0}
    assert f"1 job(s) queued on {CLASS} and no live worker serves it" in warnings

    time.sleep(0.2)
    before = scrape(api.url)
    assert value(before, "lorajobs_queue_depth", queue=CLASS) == 1
    assert value(before, "lorajobs_jobs", status="queued", queue=CLASS) == 1
    assert value(before, "lorajobs_workers", queue=CLASS) == 0
    assert value(before, "lorajobs_queue_oldest_wait_seconds", queue=CLASS) >= 0.2
    assert value(before, "lorajobs_workers", queue="cpu") >= 1  # this stack's dataset worker, and the session's

    worker = WorkerProcess(settings, CLASS, TEST_OUTPUT / "logs" / "ops-worker-gpu-ops.log").start()
    try:
        done = wait_status(client, job.id, timeout=120)
        assert done.status == "succeeded", done.error
        assert readyz_queue(api.url) == ({"queued": 0, "workers": 1}, [])
        after = scrape(api.url)
    finally:
        worker.stop()
    assert value(after, "lorajobs_workers", queue=CLASS) == 1
    assert value(after, "lorajobs_queue_depth", queue=CLASS) == 0
    assert value(after, "lorajobs_queue_oldest_wait_seconds", queue=CLASS) == 0
    assert value(after, "lorajobs_jobs", status="succeeded", queue=CLASS) == 1
    assert value(after, "lorajobs_job_duration_seconds_count", status="succeeded", queue=CLASS) == 1
    assert 0 < value(after, "lorajobs_job_duration_seconds_sum", status="succeeded", queue=CLASS) < 120
    assert value(after, "lorajobs_job_step_seconds_count", queue=CLASS) == 1
    assert value(after, "lorajobs_trained_tokens_total", queue=CLASS) == done.trained_tokens > 0
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert value(after, "lorajobs_api_request_duration_seconds_count", method="GET", route=route, status="200") >= 1
    # A stopped worker takes itself off at once: its class is unserved again.
    assert readyz_queue(api.url) == ({"queued": 0, "workers": 0}, [])
