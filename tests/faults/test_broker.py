"""Broker faults on real services: messages lost or never sent, and every job and file still reaches a final state.

Each test runs its own Redis (no persistence), API, workers and sweeper, so breaking the broker touches nothing else.
"""

import io
import time

import httpx
import openai
import pytest

from tests.conftest import TEST_OUTPUT, make_project_key
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status
from tests.faults.brokers import RedisServer, Sweeper
from tests.faults.rows import file_row, job_row
from tests.stack import ApiServer, WorkerProcess

LOGS = TEST_OUTPUT / "logs"


@pytest.fixture(autouse=True)
def logs_folder():
    LOGS.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def parts(settings, broker):
    """Start parts of a stack on the test's own broker; everything started is stopped at the end."""
    mine = settings.model_copy(update={"broker_url": broker.url})
    started = []

    def start(part):
        started.append(part.start())
        return part

    yield mine, start
    for part in reversed(started):
        part.stop()


def client_for(api: ApiServer, settings) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key=make_project_key(settings).key, max_retries=0, timeout=60)


def wait_file(client: openai.OpenAI, file_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = client.files.retrieve(file_id)
        if row.status in ("processed", "error"):
            return row
        time.sleep(0.2)
    raise AssertionError(f"file {file_id} is still {row.status} after {timeout} s")


def test_the_broker_down_during_both_posts_answers_200_and_both_complete_once_it_returns(parts, broker):
    settings, start = parts
    api = start(ApiServer(settings))
    client = client_for(api, settings)

    began = time.monotonic()
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(support_dataset(24))), purpose="fine-tune")
    assert uploaded.status == "uploaded" and time.monotonic() - began < 15

    broker.start()
    start(WorkerProcess(settings, "cpu", LOGS / "faults-down-cpu.log"))
    start(WorkerProcess(settings, "gpu", LOGS / "faults-down-gpu.log"))
    start(Sweeper(settings, LOGS / "faults-down-sweeper.log"))
    assert wait_file(client, uploaded.id).status == "processed"
    assert file_row(settings, uploaded.id).resends >= 1

    broker.kill()
    began = time.monotonic()
    job = create_job(client, uploaded.id)
    assert job.status == "queued" and time.monotonic() - began < 15
    broker.start()
    done = wait_status(client, job.id, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.model_extra["attempts"] == 1 and done.model_extra["resends"] >= 1


def test_redis_restarted_empty_with_a_job_queued_one_running_and_a_file_validating(parts, broker):
    settings, start = parts
    broker.start()
    api = start(ApiServer(settings))
    client = client_for(api, settings)
    cpu = start(WorkerProcess(settings, "cpu", LOGS / "faults-restart-cpu-1.log"))
    start(WorkerProcess(settings, "gpu", LOGS / "faults-restart-gpu.log"))
    start(Sweeper(settings, LOGS / "faults-restart-sweeper.log"))
    training_file = processed_file(client, support_dataset(48))
    cpu.stop()

    running = create_job(client, training_file)
    assert wait_status(client, running.id, statuses=("running",), timeout=60).status == "running"
    queued = create_job(client, training_file)
    validating = client.files.create(file=("more.jsonl", io.BytesIO(support_dataset(24, seed=1))), purpose="fine-tune")

    broker.kill()
    assert client.fine_tuning.jobs.retrieve(running.id).status == "running"
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"
    assert client.files.retrieve(validating.id).status == "uploaded"
    broker.start()
    start(WorkerProcess(settings, "cpu", LOGS / "faults-restart-cpu-2.log"))

    assert wait_file(client, validating.id).status == "processed"
    for job in (running, queued):
        done = wait_status(client, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        assert done.model_extra["attempts"] == 1
    assert file_row(settings, validating.id).resends >= 1
    assert client.fine_tuning.jobs.retrieve(queued.id).model_extra["resends"] >= 1


@pytest.mark.parametrize("transport", ["redis", "filesystem"])
def test_kill_9_of_the_cpu_worker_mid_validation_the_file_is_validated_by_the_next_worker(settings, tmp_path,
                                                                                          transport):
    server = RedisServer(tmp_path).start() if transport == "redis" else None
    mine = settings.model_copy(update={"broker_url": server.url if server else "filesystem://",
                                       "data_dir": tmp_path / "data"})
    api, sweeper = ApiServer(mine).start(), Sweeper(mine, LOGS / f"faults-kill-sweeper-{transport}.log").start()
    logs = [LOGS / f"faults-kill-cpu-{transport}-{n}.log" for n in (1, 2)]
    first = WorkerProcess(mine, "cpu", logs[0]).start()
    second = None
    try:
        client = client_for(api, mine)
        # Big enough that validating it (format, then tokens for every catalogue model) takes seconds.
        uploaded = client.files.create(file=("big.jsonl", io.BytesIO(support_dataset(8000))), purpose="fine-tune")
        deadline = time.monotonic() + 120
        while b"lorajobs.files.validate[" not in logs[0].read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        first.kill_hard()
        assert client.files.retrieve(uploaded.id).status == "uploaded", "validation ended before the kill"
        second = WorkerProcess(mine, "cpu", logs[1]).start()
        done = wait_file(client, uploaded.id, timeout=180)
        assert done.status == "processed", done.status_details
        assert file_row(mine, uploaded.id).resends >= 1
    finally:
        for part in (second, sweeper, api):
            if part:
                part.stop()
        first.log.close()
        if server:
            server.kill()


def test_a_merge_asked_while_the_broker_is_down_is_produced_once_it_returns(parts, broker):
    settings, start = parts
    broker.start()
    api = start(ApiServer(settings))
    client = client_for(api, settings)
    start(WorkerProcess(settings, "cpu", LOGS / "faults-merge-cpu.log"))
    start(WorkerProcess(settings, "gpu", LOGS / "faults-merge-gpu.log"))
    start(Sweeper(settings, LOGS / "faults-merge-sweeper.log", LORAJOBS_MERGE_RESEND_SECONDS="3"))
    done = wait_status(client, create_job(client, processed_file(client, support_dataset(24))).id, timeout=300)
    assert done.status == "succeeded", done.error

    broker.kill()
    merged = f"fine_tuning/jobs/{done.id}/merged"
    first = client.get(merged, cast_to=httpx.Response, options={"params": {"redirect": "false"}})
    assert first.status_code == 202
    broker.start()
    deadline = time.monotonic() + 240
    while (answer := client.get(merged, cast_to=httpx.Response,
                                options={"params": {"redirect": "false"}})).status_code == 202:
        assert time.monotonic() < deadline, "the merged model was never produced"
        time.sleep(0.5)
    assert answer.status_code == 200 and answer.headers["x-content-sha256"]
    assert job_row(settings, done.id).artifacts["merged"]["resends"] >= 1
