"""The pre-flight plan through the API: dry runs, every job's plan, routing by GPU class, queue position and ETA,
refusal of a job that fits nowhere, and out-of-memory recovery driven by a real torch.OutOfMemoryError."""

import math

import httpx
import openai
import pytest

from tests.conftest import TEST_OUTPUT, TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status
from tests.e2e.test_families import register
from tests.stack import ApiServer, WorkerProcess

BODY = {"model": TINY_MODEL_ID, "quantization": "none", "lora": {"r": 4}, "max_seq_length": 64,
        "hyperparameters": {"n_epochs": 2, "batch_size": 4}}


def test_a_dry_run_answers_the_plan_and_creates_nothing(openai_client, http):
    training_file = processed_file(openai_client, support_dataset(24))
    answer = http.post("fine_tuning/jobs", json={**BODY, "training_file": training_file, "dry_run": True})
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["object"] == "fine_tuning.job.plan" and plan["model"] == TINY_MODEL_ID
    assert plan["trainable_parameters"] > 0 and plan["total_parameters"] > plan["trainable_parameters"]
    assert plan["n_examples"] == 22 and plan["steps"] == 2 * 6  # 24 less the 10 % held out, batches of 4
    cpu = next(c for c in plan["classes"] if c["name"] == "cpu")
    assert cpu["fits"] and cpu["memory"]["peak"] > 0 and cpu["duration_seconds"] > 0
    through_sdk = openai_client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=training_file, method={"type": "supervised", "supervised": {
            "hyperparameters": BODY["hyperparameters"]}},
        extra_body={"dry_run": True, "quantization": "none", "lora": {"r": 4}, "max_seq_length": 64}).to_dict()
    assert through_sdk["object"] == "fine_tuning.job.plan"
    assert through_sdk["trainable_parameters"] == plan["trainable_parameters"]
    assert list(openai_client.fine_tuning.jobs.list()) == []

    job = create_job(openai_client, training_file)
    assert job.model_extra["plan"]["trainable_parameters"] == plan["trainable_parameters"]
    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded", done.error
    # The planner's counts are PEFT's, and the measured peak is recorded next to the prediction.
    assert done.model_extra["trainable_parameters"] == plan["trainable_parameters"]
    assert done.model_extra["total_parameters"] == plan["total_parameters"]
    placement = done.model_extra["placement"]
    assert placement["measured_on"] == "cpu" and placement["measured_peak_bytes"] > 0
    assert placement["predicted_peak_bytes"] == cpu["memory"]["peak"]
    assert any(e.message.startswith("Peak memory measured") for e in all_events(openai_client, job.id))


def test_a_dry_run_while_the_file_validates_says_what_it_does_not_know(openai_client, http):
    uploaded = openai_client.files.create(file=("train.jsonl", support_dataset(24)), purpose="fine-tune")
    plan = http.post("fine_tuning/jobs", json={**BODY, "training_file": uploaded.id, "dry_run": True}).json()
    assert plan["object"] == "fine_tuning.job.plan" and plan["trainable_parameters"] > 0
    if plan["n_examples"] is None:
        assert any("still being validated" in note for note in plan["notes"])


def test_quantization_auto_is_settled_by_the_plan_once_the_file_is_validated(openai_client):
    uploaded = openai_client.files.create(file=("train.jsonl", support_dataset(24)), purpose="fine-tune")
    job = create_job(openai_client, uploaded.id, quantization="auto")
    if job.status == "validating_files":  # not chosen before the file's token statistics are known
        assert job.model_extra["quantization"] == "auto"
    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded", done.error
    # The tiny model's 16-bit base fits this CPU: plain LoRA, said in the plan; the worker had nothing to choose.
    assert done.model_extra["quantization"] == "none" and done.model_extra["plan"]["quantization"] == "none"
    assert done.model_extra["plan"]["notes"][0].startswith("quantization 'auto' chose 'none' (LoRA on the 16-bit "
                                                           "base): it fits ")
    assert not any(e.message.startswith("quantization 'auto'") for e in all_events(openai_client, job.id))
    assert done.model_extra.get("served_eval") is None


def test_a_model_added_after_the_file_was_validated_is_planned_from_another_tokenizers_count(
        openai_client, http, stack, family_catalogue):
    training_file = processed_file(openai_client, support_dataset(24))
    counted = openai_client.get(f"/files/{training_file}/report", cast_to=object)["report"]["token_stats"]
    model_id = register("qwen2", family_catalogue, stack.settings)  # after the file's validation
    assert model_id not in counted
    plan = http.post("fine_tuning/jobs", json={**BODY, "model": model_id, "max_seq_length": 1024,
                                               "training_file": training_file, "dry_run": True}).json()
    # Planned from the longest count the file has, a quarter longer, not as 1,024-token rows.
    longest = max((stats for stats in counted.values() if stats["count"]), key=lambda stats: (stats["mean"], stats["max"]))
    assert plan["longest_example"] == math.ceil(longest["max"] * 1.25) < 1024
    assert plan["tokens_per_example"] == pytest.approx(longest["mean"] * 1.25)
    assert any(note.startswith(f"The training file's tokens were not counted with {model_id}'s tokenizer")
               and f"takes {longest['model']}'s count" in note for note in plan["notes"])


@pytest.fixture
def classes_stack(settings):
    """An API routing to two classes, with a broker namespace of its own and a dataset worker."""
    mine = settings.model_copy(update={"broker_prefix": settings.broker_prefix + "classes:",
                                       "gpu_classes": "gpu-small:0.5,gpu-big:40"})
    api = ApiServer(mine).start()
    cpu = WorkerProcess(mine, "cpu", TEST_OUTPUT / "logs" / "classes-worker-cpu.log").start()
    yield mine, api
    cpu.stop()
    api.stop()


def test_jobs_route_to_the_smallest_class_that_fits_and_recover_from_out_of_memory(classes_stack, monkeypatch):
    settings, api = classes_stack
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key.key, max_retries=0)
    http = httpx.Client(base_url=api.url + "/v1/", headers={"Authorization": f"Bearer {key.key}"}, timeout=60)
    training_file = processed_file(client, support_dataset(24))

    # Where only a class too small is configured, the job is refused with its plan and advice; nothing is created.
    small_only = ApiServer(settings.model_copy(update={"gpu_classes": "gpu-small:0.5"})).start()
    try:
        refused = httpx.post(small_only.url + "/v1/fine_tuning/jobs", headers=http.headers, timeout=60,
                             json={**BODY, "training_file": training_file})
    finally:
        small_only.stop()
    assert refused.status_code == 400 and refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["code"] == "does_not_fit" and "gpu-small" in error["message"]
    assert error["plan"]["object"] == "fine_tuning.job.plan" and error["plan"]["smallest_fitting_class"] is None
    assert list(client.fine_tuning.jobs.list()) == []

    first = create_job(client, training_file, save_steps=1, eval_steps=50)
    second = create_job(client, training_file, save_steps=1, eval_steps=50)
    for job in (first, second):
        assert job.status == "queued"
        assert job.model_extra["placement"]["class"] == "gpu-big"
        assert job.model_extra["placement"]["queue"] == "gpu-big"
    # No worker serves gpu-big yet: the plan says so; the second job waits behind the first.
    assert any("No live worker serves gpu-big" in note for note in first.model_extra["plan"]["notes"])
    waiting = client.fine_tuning.jobs.retrieve(second.id)
    assert waiting.model_extra["queue_position"] == 2
    assert waiting.estimated_finish is not None and waiting.estimated_finish >= int(second.created_at)
    assert client.fine_tuning.jobs.retrieve(first.id).model_extra["queue_position"] == 1
    client.fine_tuning.jobs.cancel(second.id)

    # The worker of class gpu-big raises a real torch.OutOfMemoryError at step 2 while the micro-batch is above 1.
    monkeypatch.setenv("LORAJOBS_TEST_FAULT_OOM_AT_STEP", "2")
    worker = WorkerProcess(settings, "gpu-big", TEST_OUTPUT / "logs" / "classes-worker-gpu-big.log").start()
    try:
        done = wait_status(client, first.id, timeout=240)
    finally:
        worker.stop()
    assert done.status == "succeeded", done.error
    events = all_events(client, first.id)
    steps = [e.message for e in events if e.message.startswith("Out of GPU memory")]
    assert len(steps) == 3 and all(e.level == "warn" for e in events if e.message in steps)
    # The plan kept activations on gpu-big: first they are recomputed, at the same micro-batch; then it halves.
    assert "at micro-batch 4 with activations kept" in steps[0] and "with gradient checkpointing" in steps[0]
    assert "micro-batch 2 and 2 accumulation steps (the same batch of 4)" in steps[1]
    assert "micro-batch 1 and 4 accumulation steps (the same batch of 4)" in steps[2]
    assert done.model_extra["attempts"] == 1  # OOM retries spend no attempts
    assert done.model_extra["placement"]["micro_batch_size"] == 1
    assert done.model_extra["placement"]["gradient_checkpointing"] is True
    started = [e.message for e in events if e.message.startswith("Training ") and " examples on " in e.message]
    assert "(micro-batch 4 × 1)" in started[0] and "(micro-batch 1 × 4)" in started[-1]  # the worker followed it
    assert done.model_extra["resolved_hyperparameters"]["batch_size"] == 4


def test_a_job_waiting_for_its_file_is_routed_once_validated_and_fails_if_it_fits_no_class(settings):
    mine = settings.model_copy(update={"broker_prefix": settings.broker_prefix + "small:", "gpu_classes": "gpu-small:0.5"})
    api = ApiServer(mine).start()
    cpu = WorkerProcess(mine, "cpu", TEST_OUTPUT / "logs" / "small-worker-cpu.log").start()
    try:
        key = make_project_key(mine)
        client = openai.OpenAI(base_url=api.url + "/v1", api_key=key.key, max_retries=0)
        uploaded = client.files.create(file=("train.jsonl", support_dataset(24)), purpose="fine-tune")
        try:
            job = create_job(client, uploaded.id)
        except openai.BadRequestError as refused:  # the file was validated first: refused at once instead
            assert refused.code == "does_not_fit"
            return
        assert job.status == "validating_files"
        assert any("still being validated" in note for note in job.model_extra["plan"]["notes"])
        failed = wait_status(client, job.id, timeout=60)
    finally:
        cpu.stop()
        api.stop()
    assert failed.status == "failed" and failed.error.code == "does_not_fit"
    assert "gpu-small" in failed.error.message


def test_a_dry_run_counts_general_replay_in_the_steps_of_chat_data_and_not_of_text(openai_client, http):
    chats = processed_file(openai_client, support_dataset(80))
    texts = processed_file(openai_client, b"".join(
        b'{"text": "Ferry note %d: the boat leaves pier %d at %d o\'clock."}\n' % (i, i % 5, i % 12 + 1)
        for i in range(80)))
    body = {**BODY, "hyperparameters": {"n_epochs": 2, "batch_size": 8}, "dry_run": True}
    chat_plan = http.post("fine_tuning/jobs", json={**body, "training_file": chats}).json()
    # 80 chats less the 10 % held out: 72 trained, and the auto rule replays 72 // 8 = 9 of the base's answers
    assert (chat_plan["n_examples"], chat_plan["replayed_examples"]) == (72, 9)
    assert chat_plan["steps"] == 2 * math.ceil((72 + 9) / 8)
    assert any(note.startswith("General replay: up to 9 answers of the base") for note in chat_plan["notes"])
    text_plan = http.post("fine_tuning/jobs", json={**body, "training_file": texts}).json()
    assert (text_plan["n_examples"], text_plan["replayed_examples"]) == (72, 0)
    assert text_plan["steps"] == 2 * 9 and not any("replay" in note for note in text_plan["notes"])
