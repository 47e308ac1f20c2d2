"""The rest of OpenAI's surface, through the `openai` SDK where it has a method: file and model deletion that keep
job history, 400 for malformed requests, Idempotency-Key reuse, metadata limits, `trained_tokens`, `expires_after`,
and the caps on a job's spec."""

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import text

from tests.api.test_files import chat_lines
from tests.api.test_quotas import serve
from tests.conftest import TINY_MODEL_ID
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status

LONG = {"n_epochs": 40, "batch_size": 1}  # a job that is still running when the test looks at it


def objects_under(settings, prefix: str) -> list[str]:
    from core.storage import get_storage

    return get_storage(settings).list_keys(prefix)


def test_trained_tokens_is_null_until_the_job_has_finished(trained, openai_client):
    assert trained.job.trained_tokens and trained.job.trained_tokens > 0
    file_id = processed_file(openai_client, support_dataset(12))
    job = create_job(openai_client, file_id, hyperparameters=LONG)
    try:
        deadline = time.time() + 120
        running = openai_client.fine_tuning.jobs.retrieve(job.id)
        while not (running.status == "running" and (running.model_extra.get("progress") or {}).get("step")):
            assert time.time() < deadline, running.status
            time.sleep(0.2)
            running = openai_client.fine_tuning.jobs.retrieve(job.id)
        assert running.trained_tokens is None
    finally:
        openai_client.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_status(openai_client, job.id, timeout=60)
    assert cancelled.status == "cancelled"


def test_the_auto_learning_rate_follows_the_models_width_and_the_worker_trains_at_it(trained):
    resolved = trained.job.model_extra["resolved_hyperparameters"]
    # The tiny test model is 64 wide: sqrt(4 / 8) × (4096 / 64)^0.781 is far above the cap of 5 × 2e-4.
    assert "(width 4096 / 64)^0.781" in resolved["auto_rules"]["learning_rate_multiplier"]
    assert resolved["learning_rate"] == pytest.approx(1e-3) and trained.job.hyperparameters.learning_rate_multiplier == 5
    rows = trained.client.files.content(trained.job.result_files[0]).text.splitlines()
    column = rows[0].split(",").index("learning_rate")
    rates = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert max(rates) == pytest.approx(1e-3)  # the peak of the worker's schedule: what the API said


def test_merged_models_quota_refuses_another_merge_until_a_model_is_deleted(trained, settings):
    client = trained.client
    second = wait_status(client, create_job(client, trained.file_id, hyperparameters={"n_epochs": 1,
                                                                                      "batch_size": 4}).id)
    assert second.status == "succeeded", second.error
    api = serve(settings, max_merged_models_per_project=1)
    try:
        with httpx.Client(base_url=api.url + "/v1", headers={"Authorization": f"Bearer {trained.key}"}) as http:
            # Asked for at once (a client and its retry): one merge, pending for each, none counted against the other.
            with ThreadPoolExecutor(16) as pool:
                asked = list(pool.map(lambda _: http.get(f"fine_tuning/jobs/{second.id}/merged"), range(16)))
            assert [answer.status_code for answer in asked] == [202] * 16, [answer.text for answer in asked]
            refused = http.get(f"fine_tuning/jobs/{trained.job.id}/merged")
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert "LORAJOBS_MAX_MERGED_MODELS_PER_PROJECT" in refused.json()["error"]["message"]
            assert refused.headers["x-should-retry"] == "false" and refused.headers["retry-after"]
            client.models.delete(second.fine_tuned_model)  # frees its merged model
            assert http.get(f"fine_tuning/jobs/{trained.job.id}/merged").status_code == 202
    finally:
        api.stop()


def test_a_file_an_unfinished_job_uses_cannot_be_deleted(openai_client):
    file_id = processed_file(openai_client, support_dataset(12))
    job = create_job(openai_client, file_id, hyperparameters=LONG)
    with pytest.raises(openai.ConflictError) as caught:
        openai_client.files.delete(file_id)
    assert caught.value.code == "file_in_use" and caught.value.param == "file_id"
    openai_client.fine_tuning.jobs.cancel(job.id)
    wait_status(openai_client, job.id, timeout=60)
    assert openai_client.files.delete(file_id).deleted


def test_deleting_a_file_a_finished_job_trained_on_keeps_the_jobs_history(trained, settings):
    client, job = trained.client, trained.job
    project_files = objects_under(settings, "projects/")
    assert any(key.endswith(trained.file_id) for key in project_files)
    deleted = client.files.delete(trained.file_id)
    assert deleted.deleted and deleted.id == trained.file_id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(trained.file_id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(trained.file_id)
    assert trained.file_id not in [f.id for f in client.files.list()]
    assert not any(key.endswith(trained.file_id) for key in objects_under(settings, "projects/"))  # bytes gone
    # The job still names the file it trained on, and its history reads as before.
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.training_file == trained.file_id and again.status == "succeeded"
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    assert client.fine_tuning.jobs.list_events(job.id).data
    with pytest.raises(openai.NotFoundError):
        client.files.delete(trained.file_id)


def test_deleting_a_fine_tuned_model_removes_adapter_merged_model_and_checkpoints(trained, settings):
    client, job = trained.client, trained.job
    model = job.fine_tuned_model
    assert model in [m.id for m in client.models.list()]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    prefix = f"projects/{job.organization_id}/jobs/{job.id}/"
    assert objects_under(settings, prefix)
    with httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {trained.key}"}) as http:
        # Being made, or made (the merge quota test asked for it): deleted either way.
        assert http.get(f"fine_tuning/jobs/{job.id}/merged").status_code in (202, 307)

        deleted = client.models.delete(model)
        assert deleted.deleted and deleted.id == model and deleted.object == "model"

        assert model not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model)
        assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
        for path in (f"fine_tuning/jobs/{job.id}/adapter?redirect=false",
                     f"fine_tuning/jobs/{job.id}/adapter?redirect=false&checkpoint={checkpoints[0].id}",
                     f"fine_tuning/jobs/{job.id}/merged"):
            assert http.get(path).status_code == 404, path
    # A merge still being made when the model was deleted deletes its own tar when it finishes.
    deadline = time.time() + 60
    while objects_under(settings, prefix) and time.time() < deadline:
        time.sleep(0.5)
    assert objects_under(settings, prefix) == []
    # The job's history stays: status, the model's name, its events.
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.status == "succeeded" and again.fine_tuned_model == model
    assert client.fine_tuning.jobs.list_events(job.id).data
    with pytest.raises(openai.NotFoundError):
        client.models.delete(model)


def test_a_base_model_cannot_be_deleted(openai_client):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai_client.models.delete(TINY_MODEL_ID)
    assert caught.value.param == "model"
    assert TINY_MODEL_ID in [m.id for m in openai_client.models.list()]


def test_malformed_requests_are_400_invalid_request_error_with_param(openai_client):
    cases = [
        (lambda: openai_client.fine_tuning.jobs.list(limit=0), "limit"),
        (lambda: openai_client.files.list(order="sideways"), "order"),
        (lambda: openai_client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=["not", "a", "string"]),
         "training_file"),
        (lambda: openai_client.post("/fine_tuning/jobs", body={"training_file": "file-x"}, cast_to=object), "model"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.status_code == 400
        assert caught.value.type == "invalid_request_error" and caught.value.param == param, caught.value.body


@pytest.mark.parametrize("field, value, param", [
    ("n_epochs", 51, "n_epochs"),
    ("batch_size", 257, "batch_size"),
    ("save_total_limit", 21, "save_total_limit"),
    ("max_seq_length", 32_769, "max_seq_length"),
])
def test_caps_on_a_jobs_spec_are_400_naming_the_field(openai_client, field, value, param):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file="file-any",
                                              extra_body={field: value})
    assert caught.value.param == param, caught.value.body


def test_an_idempotency_key_replays_the_same_body_and_refuses_another(openai_client):
    file_id = processed_file(openai_client, support_dataset(12))
    key = f"idem-{uuid.uuid4().hex}"
    body = {"model": TINY_MODEL_ID, "training_file": file_id, "extra_headers": {"Idempotency-Key": key},
            "extra_body": {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, **LONG}}
    first = openai_client.fine_tuning.jobs.create(**body)
    try:
        assert openai_client.fine_tuning.jobs.create(**body).id == first.id
        with pytest.raises(openai.ConflictError) as caught:
            openai_client.fine_tuning.jobs.create(**{**body, "suffix": "other"})
        assert caught.value.code == "idempotency_key_reused" and first.id in caught.value.message
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert [j.id for j in openai_client.fine_tuning.jobs.list()] == [first.id]
    finally:
        openai_client.fine_tuning.jobs.cancel(first.id)


def test_metadata_is_held_to_openais_limits_and_odd_filter_keys_are_400_not_500(openai_client):
    file_id = processed_file(openai_client, support_dataset(12))
    base = {"model": TINY_MODEL_ID, "training_file": file_id,
            "extra_body": {"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64, **LONG}}
    for metadata in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {'a"b': "v"}):
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.fine_tuning.jobs.create(**base, metadata=metadata)
        assert caught.value.param.startswith("metadata"), caught.value.body
    job = openai_client.fine_tuning.jobs.create(**base, metadata={"team": "legal", "k" * 64: "v" * 512})
    try:
        assert [j.id for j in openai_client.fine_tuning.jobs.list(metadata={"team": "legal"})] == [job.id]
        assert openai_client.fine_tuning.jobs.list(metadata={"team": "tax"}).data == []
        for key in ('a"b', "a\\b", "k" * 65, "$.x", "a']"):
            with httpx.Client(base_url=str(openai_client.base_url),
                              headers={"Authorization": f"Bearer {openai_client.api_key}"}) as http:
                response = http.get("fine_tuning/jobs", params={f"metadata[{key}]": "x"})
            assert response.status_code in (200, 400), (key, response.text)
            if response.status_code == 200:
                assert response.json()["data"] == []
            else:
                assert response.json()["error"]["param"].startswith("metadata")
    finally:
        openai_client.fine_tuning.jobs.cancel(job.id)


def test_expires_after_sets_expires_at_and_an_expired_file_is_gone(openai_client, settings):
    created = openai_client.files.create(file=("e.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune",
                                         expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    assert openai_client.files.retrieve(created.id).expires_at == created.expires_at
    for expires_after, param in (({"anchor": "created_at", "seconds": 10}, "expires_after.seconds"),
                                 ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")):
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.files.create(file=("e.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune",
                                       expires_after=expires_after)
        assert caught.value.param == param
    swept = openai_client.files.create(file=("s.jsonl", io.BytesIO(chat_lines(10))), purpose="fine-tune",
                                       expires_after={"anchor": "created_at", "seconds": 3600})
    # An hour passes: move the file's expiry into the past, as the clock would.
    expire(settings, created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(created.id)
    assert created.id not in [f.id for f in openai_client.files.list()]  # reading the list also purges it
    assert not any(key.endswith(created.id) for key in objects_under(settings, "projects/"))
    # A project that never reads again: the sweeper deletes its expired files.
    from worker.sweep import sweep

    expire(settings, swept.id)
    assert any(key.endswith(swept.id) for key in objects_under(settings, "projects/"))
    assert sweep(settings)["files_expired"] >= 1
    assert not any(key.endswith(swept.id) for key in objects_under(settings, "projects/"))


def expire(settings, file_id: str) -> None:
    from db.session import transaction

    with transaction(settings.database_url) as session:
        session.execute(text("UPDATE files SET expires_at = :t WHERE id = :id"), {"t": time.time() - 1, "id": file_id})
