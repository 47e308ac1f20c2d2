"""Fine-tuning jobs end to end: the `openai` SDK, the API, real PostgreSQL, Redis, S3 and worker processes."""

import tarfile
import time
import zipfile

import httpx
import openai
import pytest

from core import queue
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status


@pytest.fixture
def training_file(openai_client):
    return processed_file(openai_client, support_dataset(24))


def test_upload_train_download_and_load_the_adapter(openai_client, http, training_file, project_key, models_dir,
                                                    tmp_path):
    job = create_job(openai_client, training_file, metadata={"team": "support"})
    assert job.id.startswith("ftjob-") and job.status in ("queued", "running")
    assert job.model == TINY_MODEL_ID and job.seed >= 0
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.model_extra["quantization"] == "none" and job.model_extra["lora"]["r"] == 4

    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY_MODEL_ID}:{project_key.project}:e2e:{job.id}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert done.model_extra["progress"]["percent"] == 100.0
    assert done.model_extra["baseline_eval_loss"] > done.model_extra["final_eval_loss"]

    events = all_events(openai_client, job.id)
    messages = [e.message for e in events]
    assert messages[-1] == "The job has successfully completed"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["step"] >= 1 for e in metrics)

    checkpoints = list(openai_client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert any(c.metrics.valid_loss is not None for c in checkpoints)

    results_file = done.result_files[0]  # then the held-out answers (tests/e2e/test_quality.py)
    csv_text = openai_client.files.content(results_file).text
    assert csv_text.splitlines()[0] == "step,train_loss,learning_rate,valid_loss,valid_mean_token_accuracy"

    # S3 answers with a redirect to a presigned URL; the sha256 travels in a header.
    redirect = http.get(f"fine_tuning/jobs/{job.id}/adapter")
    assert redirect.status_code == 307 and redirect.headers["x-content-sha256"] == done.model_extra["adapter_sha256"]
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(httpx.get(redirect.headers["location"]).content)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                          "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
        tar.extractall(tmp_path / "adapter", filter="data")
    streamed = http.get(f"fine_tuning/jobs/{job.id}/adapter", params={"format": "zip", "redirect": "false"})
    assert streamed.status_code == 200
    (tmp_path / "adapter.zip").write_bytes(streamed.content)
    assert zipfile.ZipFile(tmp_path / "adapter.zip").testzip() is None

    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_ID and not config.get("modules_to_save")
    base_path = models_dir / TINY_MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = tokenizer("How much is the lamp?", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "adapter")
    with torch.no_grad():
        tuned_logits = tuned(**inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    # The job reports what PEFT counts for the adapter it delivered.
    weights = dict(tuned.named_parameters())
    trainable = sum(p.numel() for name, p in weights.items() if "lora_" in name)
    assert done.model_extra["trainable_parameters"] == trainable > 0
    assert done.model_extra["total_parameters"] == sum(p.numel() for p in weights.values())
    assert 0 < done.model_extra["trainable_percent"] < 100 and done.model_extra["chat_template"] == "model"
    assert any(m.startswith(f"Training {trainable:,} of ") for m in messages)

    models = {m.id for m in openai_client.models.list()}
    assert {TINY_MODEL_ID, done.fine_tuned_model} <= models
    assert openai_client.models.retrieve(done.fine_tuned_model).owned_by == project_key.project
    listed = openai_client.fine_tuning.jobs.list(extra_query={"metadata[team]": "support"})
    assert [j.id for j in listed.data] == [job.id]
    assert openai_client.fine_tuning.jobs.list(extra_query={"metadata[team]": "sales"}).data == []


@pytest.mark.parametrize(("lora", "chat_template", "param", "says"), [
    ({"target_modules": ["query_key_value"]}, None, "lora.target_modules", "q_proj, k_proj, v_proj, o_proj"),
    ({"target_modules": ["q_proj", "lm_head"]}, None, "lora.target_modules", "serving engines"),
    ({"target_modules": "attention"}, "chatml", None, None),
])
def test_target_modules_and_templates_are_checked_against_the_model_before_anything_queues(
        openai_client, training_file, lora, chat_template, param, says):
    extra = {"lora": lora} | ({"chat_template": chat_template} if chat_template else {})
    if param is None:
        job = create_job(openai_client, training_file, **extra)
        assert job.model_extra["spec"]["chat_template"] == chat_template
        openai_client.fine_tuning.jobs.cancel(job.id)
        return
    with pytest.raises(openai.BadRequestError) as refused:
        create_job(openai_client, training_file, **extra)
    error = refused.value.body
    assert error["param"] == param and error["code"] == "invalid_target_modules" and says in error["message"]
    assert openai_client.fine_tuning.jobs.list().data == []  # nothing was created


def test_cancel_a_running_job_and_a_queued_one(openai_client, training_file):
    long_job = create_job(openai_client, training_file, hyperparameters={"n_epochs": 30, "batch_size": 1})
    queued = create_job(openai_client, training_file)
    wait_status(openai_client, long_job.id, statuses=("running",))
    cancelled_queued = openai_client.fine_tuning.jobs.cancel(queued.id)
    assert cancelled_queued.status == "cancelled"
    openai_client.fine_tuning.jobs.cancel(long_job.id)
    stopped = wait_status(openai_client, long_job.id)
    assert stopped.status == "cancelled"
    assert stopped.model_extra["progress"] is None or stopped.model_extra["progress"]["percent"] < 100
    with pytest.raises(openai.ConflictError) as caught:
        openai_client.fine_tuning.jobs.cancel(long_job.id)
    assert caught.value.response.headers["x-should-retry"] == "false"
    # The queued job never started, even once its message reached the worker.
    wait_status(openai_client, create_job(openai_client, training_file).id)
    assert not [e for e in all_events(openai_client, queued.id) if e.message.startswith("Training started")]
    assert openai_client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"


def test_a_duplicate_message_trains_once(openai_client, settings, training_file):
    job = create_job(openai_client, training_file)
    queue.send(settings, queue.TRAIN_JOB, job.id)
    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded"
    queue.send(settings, queue.TRAIN_JOB, job.id)
    follow_up = create_job(openai_client, training_file)
    wait_status(openai_client, follow_up.id)
    events = all_events(openai_client, job.id)
    assert sum("Training started" in e.message for e in events) == 1
    assert sum(e.message == "The job has successfully completed" for e in events) == 1
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert len(steps) == len(set(steps))
    assert openai_client.fine_tuning.jobs.retrieve(job.id).model_extra["attempts"] == 1


def test_idempotency_key_returns_the_same_job(openai_client, training_file):
    headers = {"Idempotency-Key": "create-42"}
    body = {"model": TINY_MODEL_ID, "training_file": training_file, "quantization": "none"}
    first = openai_client.post("/fine_tuning/jobs", body=body, cast_to=object, options={"headers": headers})
    again = openai_client.post("/fine_tuning/jobs", body=body, cast_to=object, options={"headers": headers})
    assert first["id"] == again["id"]
    assert len(openai_client.fine_tuning.jobs.list().data) == 1
    openai_client.fine_tuning.jobs.cancel(first["id"])


@pytest.mark.parametrize("extra, param, code", [
    ({"model": "no/such-model"}, "model", "model_not_found"),
    ({"lora": {"r": 0}}, "lora.r", "invalid_request"),
    ({"quantization": "int3"}, "quantization", "invalid_request"),
    ({"learning_rate": 1e-4, "hyperparameters": {"learning_rate_multiplier": 2.0}}, "learning_rate_multiplier",
     "invalid_request"),
    ({"not_a_field": 1}, "not_a_field", "invalid_request"),
    ({"training_file": "file-missing"}, "training_file", "invalid_file"),
])
def test_bad_requests_are_refused_before_anything_is_queued(openai_client, training_file, extra, param, code):
    body = {"model": TINY_MODEL_ID, "training_file": training_file, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.post("/fine_tuning/jobs", body=body, cast_to=object)
    assert caught.value.param == param and caught.value.code == code
    assert param in caught.value.message or "model" in caught.value.message
    assert openai_client.fine_tuning.jobs.list().data == []


def test_a_failed_file_refuses_the_job(openai_client):
    bad = openai_client.files.create(file=("bad.jsonl", b'{"text": "x"}\n' * 3), purpose="fine-tune")
    openai_client.files.wait_for_processing(bad.id, poll_interval=0.2, max_wait_seconds=30)
    with pytest.raises(openai.BadRequestError) as caught:
        create_job(openai_client, bad.id)
    assert caught.value.param == "training_file" and "too_few_examples" in caught.value.message


def test_another_projects_job_answers_404(stack, settings, openai_client, training_file):
    job = create_job(openai_client, training_file)
    other = make_project_key(settings)
    with httpx.Client(base_url=stack.v1 + "/", headers={"Authorization": f"Bearer {other.key}"}) as theirs:
        for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/checkpoints"),
                             ("GET", "/adapter")):
            response = theirs.request(method, f"fine_tuning/jobs/{job.id}{path}")
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] == "not_found"
        assert theirs.get("fine_tuning/jobs").json()["data"] == []
        created = theirs.post("fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": training_file})
        assert created.status_code == 400 and created.json()["error"]["param"] == "training_file"
    openai_client.fine_tuning.jobs.cancel(job.id)


def test_a_merged_model_is_produced_on_request_and_matches_the_adapter(openai_client, http, training_file,
                                                                       models_dir, tmp_path):
    job = wait_status(openai_client, create_job(openai_client, training_file).id)
    assert job.status == "succeeded"
    first = http.get(f"fine_tuning/jobs/{job.id}/merged")
    assert first.status_code == 202 and first.json()["status"] == "pending"
    deadline = time.time() + 120
    while (answer := http.get(f"fine_tuning/jobs/{job.id}/merged", params={"redirect": "false"})).status_code == 202:
        assert time.time() < deadline, "the merged model was never produced"
        time.sleep(0.3)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar"
    (tmp_path / "merged.tar").write_bytes(answer.content)
    with tarfile.open(tmp_path / "merged.tar") as tar:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(tar.getnames())
        tar.extractall(tmp_path / "merged", filter="data")
    adapter = http.get(f"fine_tuning/jobs/{job.id}/adapter", params={"redirect": "false"})
    (tmp_path / "adapter.tar.gz").write_bytes(adapter.content)
    with tarfile.open(tmp_path / "adapter.tar.gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = tokenizer("What is the price of the tent?", return_tensors="pt")
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL_ID)
        adapter_logits = PeftModel.from_pretrained(base, tmp_path / "adapter")(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
