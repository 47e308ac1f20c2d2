"""Per-key rate limits and per-project quotas: the 429 `rate_limit_exceeded`, its Retry-After, recovery."""

import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.api.test_files import chat_lines
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import processed_file, support_dataset
from tests.stack import ApiServer

WINDOW = 2


def serve(settings, **limits) -> ApiServer:
    """The real app on its own port with these limits (the database, broker and storage of the session)."""
    return ApiServer(settings.model_copy(update=limits)).start()


@pytest.fixture
def server(request, settings, stack):  # the stack's workers validate files and train for these servers too
    api = serve(settings, **request.param)
    yield api
    api.stop()


def assert_429(response: httpx.Response, *, retry: bool) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["message"]
    assert (response.headers.get("x-should-retry") == "false") is not retry
    return int(response.headers["retry-after"])


# Redis is the session's broker: counters in Redis. `filesystem://` is the embedded default: counters in the process.
@pytest.mark.parametrize("server", [
    {"rate_limit_requests": 5, "rate_limit_window_seconds": WINDOW},
    {"rate_limit_requests": 5, "rate_limit_window_seconds": WINDOW, "broker_url": "filesystem://"},
], indirect=True, ids=["redis", "in-process"])
def test_a_key_over_its_rate_is_429_with_retry_after_and_recovers_after_the_window(server, settings):
    key, other = make_project_key(settings).key, make_project_key(settings).key
    with httpx.Client(base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"}) as client:
        # Start at a window's beginning, so the 5 requests fall in one window.
        time.sleep(WINDOW - time.time() % WINDOW)
        assert [client.get("files").status_code for _ in range(5)] == [200] * 5
        refused = client.get("files")
        retry_after = assert_429(refused, retry=True)
        assert 1 <= retry_after <= WINDOW
        # Another key has its own count; the dashboard and the probes are not counted.
        assert httpx.get(server.url + "/v1/files", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200
        time.sleep(retry_after)
        assert client.get("files").status_code == 200
    # The openai SDK sees a RateLimitError, and with retries honours Retry-After and gets through.
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    time.sleep(WINDOW - time.time() % WINDOW)
    for _ in range(5):
        sdk.files.list()
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.files.list()
    assert caught.value.code == "rate_limit_exceeded"
    started = time.time()
    assert sdk.with_options(max_retries=2).files.list().object == "list"
    assert time.time() - started < WINDOW + 1


@pytest.mark.parametrize("server", [{"rate_limit_requests": 4, "rate_limit_window_seconds": 30}], indirect=True)
def test_redis_counts_a_keys_requests_across_api_processes(server, settings):
    """Two API servers on one Redis share each key's count: the limit holds however many processes serve."""
    second = serve(settings, rate_limit_requests=4, rate_limit_window_seconds=30)
    key = make_project_key(settings).key
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if 30 - time.time() % 30 < 5:
            time.sleep(30 - time.time() % 30)
        statuses = [httpx.get(api.url + "/v1/files", headers=headers).status_code
                    for api in (server, second, server, second, second)]
    finally:
        second.stop()
    assert statuses == [200, 200, 200, 200, 429]


@pytest.mark.parametrize("server", [{"rate_limit_uploads": 2, "rate_limit_window_seconds": 30}], indirect=True)
def test_uploads_have_their_own_lower_rate(server, settings):
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    if 30 - time.time() % 30 < 5:
        time.sleep(30 - time.time() % 30)
    for i in range(2):
        client.files.create(file=(f"{i}.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError):
        client.files.create(file=("2.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune")
    assert len(client.files.list().data) == 2  # reads are still served


@pytest.mark.parametrize("server", [{"max_files_per_project": 2, "max_file_bytes_per_project": 3000}], indirect=True)
def test_file_count_and_bytes_quotas_refuse_with_429_and_free_up_on_delete(server, settings):
    from core.storage import get_storage

    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    first = client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune")  # ~900 bytes
    stored_before = set(get_storage(settings).list_keys("projects/"))
    with httpx.Client(base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"}) as http:
        too_big = http.post("files", data={"purpose": "fine-tune"}, files={"file": ("b.jsonl", b"x" * 2500)})
        assert_429(too_big, retry=False)
        assert "LORAJOBS_MAX_FILE_BYTES_PER_PROJECT" in too_big.json()["error"]["message"]
    assert set(get_storage(settings).list_keys("projects/")) == stored_before  # nothing left of the refused one
    client.files.create(file=("b.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as caught:
        client.files.create(file=("c.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune")
    assert "LORAJOBS_MAX_FILES_PER_PROJECT" in caught.value.message
    client.files.delete(first.id)
    assert client.files.create(file=("c.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune").bytes > 0


@pytest.mark.parametrize("server", [{"max_active_jobs_per_project": 1}], indirect=True)
def test_active_jobs_quota_refuses_a_second_job_until_the_first_ends(server, settings):
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    file_id = processed_file(client, support_dataset(12))
    body = {"model": TINY_MODEL_ID, "training_file": file_id,
            "extra_body": {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, "n_epochs": 40,
                           "batch_size": 1}}
    first = client.fine_tuning.jobs.create(**body)
    with pytest.raises(openai.RateLimitError) as caught:
        client.fine_tuning.jobs.create(**body)
    assert caught.value.code == "rate_limit_exceeded" and "LORAJOBS_MAX_ACTIVE_JOBS_PER_PROJECT" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false" and caught.value.response.headers["retry-after"]
    assert client.fine_tuning.jobs.create(**{**body, "extra_body": {**body["extra_body"], "dry_run": True}})  # plans
    client.fine_tuning.jobs.cancel(first.id)
    deadline = time.time() + 60
    while client.fine_tuning.jobs.retrieve(first.id).status != "cancelled" and time.time() < deadline:
        time.sleep(0.2)
    second = client.fine_tuning.jobs.create(**body)
    client.fine_tuning.jobs.cancel(second.id)


@pytest.mark.parametrize("server", [{"max_active_jobs_per_project": 1}], indirect=True)
def test_jobs_created_at_once_cannot_overrun_the_active_jobs_quota(server, settings):
    """Each request counts the active jobs and then inserts its own: the project's row lock makes that one step, so
    requests arriving together cannot all see room for one more."""
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    file_id = processed_file(client, support_dataset(12))
    body = {"model": TINY_MODEL_ID, "training_file": file_id,
            "extra_body": {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, "n_epochs": 40}}

    def create(_):
        try:
            return client.fine_tuning.jobs.create(**body)
        except openai.RateLimitError:
            return None

    with ThreadPoolExecutor(8) as pool:
        created = [job for job in pool.map(create, range(8)) if job is not None]
    try:
        assert len(created) == 1
        assert [job.id for job in client.fine_tuning.jobs.list().data] == [created[0].id]
    finally:
        for job in created:
            client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize("server", [{"max_active_jobs_per_project": 1}], indirect=True)
def test_a_create_sent_again_while_the_first_is_in_flight_gets_that_job_not_the_quota(server, settings):
    """A client retrying with the same Idempotency-Key before its first request answered: the retry waits for the
    project's lock, then must find the first request's job, not count it against the quota."""
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    file_id = processed_file(client, support_dataset(12))
    body = {"model": TINY_MODEL_ID, "training_file": file_id, "extra_headers": {"Idempotency-Key": "retry-1"},
            "extra_body": {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, "n_epochs": 40}}

    def create(_):
        try:
            return client.fine_tuning.jobs.create(**body).id
        except openai.RateLimitError as exc:
            return exc.message

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(8)))
    try:
        assert len(set(answers)) == 1 and answers[0].startswith("ftjob-"), answers
    finally:
        for job_id in {a for a in answers if a.startswith("ftjob-")}:
            client.fine_tuning.jobs.cancel(job_id)


@pytest.mark.parametrize("server", [{"max_queued_gpu_hours_per_project": 1e-9}], indirect=True)
def test_queued_planned_hours_quota_uses_the_jobs_plan(server, settings):
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    file_id = processed_file(client, support_dataset(12))
    with pytest.raises(openai.RateLimitError) as caught:
        client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=file_id,
                                       extra_body={"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64})
    assert "planned training hours" in caught.value.message
    assert "LORAJOBS_MAX_QUEUED_GPU_HOURS_PER_PROJECT" in caught.value.message
    assert client.fine_tuning.jobs.list().data == []


def test_an_unreachable_redis_lets_requests_through_rather_than_failing_them(settings, stack):
    """Redis as broker but down: the rate limit cannot count, and the API still serves (the outage is logged)."""
    api = serve(settings, broker_url="redis://127.0.0.1:1/0", rate_limit_requests=1)
    key = make_project_key(settings).key
    try:
        statuses = [httpx.get(api.url + "/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code
                    for _ in range(3)]
    finally:
        api.stop()
    assert statuses == [200, 200, 200]


@pytest.mark.parametrize("server", [{"max_active_jobs_per_project": 1, "max_files_per_project": 1}], indirect=True)
def test_the_dashboards_forms_say_a_quota_is_reached(server, settings):
    """A person at the quota gets the form back with the quota's message, not the API's JSON error."""
    key = make_project_key(settings).key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    file_id = processed_file(client, support_dataset(12))
    running = client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=file_id, extra_body={
        "quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, "n_epochs": 40})
    try:
        with httpx.Client(base_url=server.url, timeout=60, follow_redirects=True) as browser:
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text).group(1)
            assert browser.post("/login", data={"api_key": key, "csrf_token": csrf}).status_code == 200
            form = browser.get(f"/jobs/new?training_file={file_id}").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
            job = browser.post("/jobs/new", data={"csrf_token": csrf, "model": TINY_MODEL_ID, "training_file": file_id,
                                                  "lora.r": "4", "max_seq_length": "64", "action": "create"})
            assert job.status_code == 429 and job.headers["content-type"].startswith("text/html")
            assert "Project quota reached: 1 jobs already validating, queued or running" in job.text
            upload = browser.post("/files", data={"csrf_token": csrf},
                                  files={"file": ("more.jsonl", support_dataset(12), "application/jsonl")})
            assert upload.status_code == 429 and upload.headers["content-type"].startswith("text/html")
            assert "Project quota reached: the project holds 1 files" in upload.text
    finally:
        client.fine_tuning.jobs.cancel(running.id)
