"""Quality a user can see: a job with a validation file answers held-out prompts with the base and the tuned model,
reports exact match and key facts, and delivers its best checkpoint, through the API and on the job page."""

import io
import json
import re
import tarfile

import httpx
from markupsafe import escape

from core.general import GENERAL_QUESTIONS
from tests.conftest import make_project_key
from tests.e2e.jobs_helpers import all_events, create_job, processed_file, support_dataset, wait_status


def drifting_dataset(n: int) -> bytes:
    """Answers of one repeated word: the longer it trains, the worse the real held-out answers score."""
    rows = [{"messages": [{"role": "user", "content": f"Where is my order {i}?"},
                          {"role": "assistant", "content": "order " * 12}]} for i in range(n)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def adapter_weights(archive: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return tar.extractfile("adapter_model.safetensors").read()


def job_page(stack, key: str, job_id: str) -> str:
    """The dashboard's job page, as a signed-in user gets it."""
    with httpx.Client(base_url=stack.url, timeout=60, follow_redirects=True) as client:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
        assert client.post("/login", data={"api_key": key, "csrf_token": csrf}).status_code == 200
        return client.get(f"/jobs/{job_id}").text


def test_a_job_with_a_validation_file_shows_answers_exact_match_and_delivers_its_best_checkpoint(
        openai_client, http, stack, project_key):
    training = processed_file(openai_client, drifting_dataset(16))
    validation = processed_file(openai_client, support_dataset(10, seed=1), name="valid.jsonl")
    job = create_job(openai_client, training, validation_file=validation, hyperparameters={"n_epochs": 4, "batch_size": 4},
                     learning_rate=0.1, seed=3, answer_samples=4, answer_max_new_tokens=8, save_total_limit=1,
                     early_stopping_patience=2, neftune_noise_alpha=None)  # the held-out curve below, noise-free
    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded", done.error

    # Evaluated at every checkpoint (every 2 steps); the held-out loss only rose after step 2, so patience 2 ran out
    # at step 6 of 16; the learning rate then cooled to 0 over a fifth of those steps (to step 8) from step 2's weights,
    # and the adapter is still step 2's.
    delivered = done.model_extra["delivered_checkpoint"]
    assert delivered == {"step": 2, "metric": "valid_loss", "value": delivered["value"], "last_step": 8,
                         "early_stopped": True, "cooled_from": 2}
    assert done.model_extra["final_eval_loss"] == delivered["value"]
    events = all_events(openai_client, job.id)
    messages = [e.message for e in events]
    assert any(m.startswith("Early stopping at step 6 of 16") and "cooled to 0 over steps 6-8, from the weights of "
               "step 2" in m
               and "checkpoint of step 2" in m for m in messages)

    # save_total_limit 1 keeps the newest and the best checkpoint, and the job's adapter is exactly the best.
    checkpoints = {c.step_number: c for c in openai_client.fine_tuning.jobs.checkpoints.list(job.id)}
    assert sorted(checkpoints) == [2, 8]
    best = checkpoints[2]
    job_adapter = http.get(f"fine_tuning/jobs/{job.id}/adapter", params={"redirect": "false"}).content
    best_adapter = http.get(f"fine_tuning/jobs/{job.id}/adapter",
                            params={"redirect": "false", "checkpoint": best.id}).content
    assert adapter_weights(job_adapter) == adapter_weights(best_adapter)

    # Answers side by side, and their figures in the job, its events and the delivered checkpoint's metrics.
    quality = done.model_extra["quality"]
    assert quality["sample"] == quality["answered"] == 4 and quality["max_new_tokens"] == 8
    assert quality["tuned"]["answers"] == 4 and quality["tuned"]["exact_match"] == 0.0
    assert quality["tuned"]["answers_with_facts"] == 4  # every expected answer names a price
    answers = http.get(f"fine_tuning/jobs/{job.id}/answers").json()
    assert answers["object"] == "list" and [a["part"] for a in answers["data"]] == ["held_out"] * 4 + ["general"] * 8
    first = answers["data"][0]
    assert first["object"] == "fine_tuning.job.answer" and first["expected"].startswith("The ")
    # Then the default 8 built-in general questions, which show the drift outside the domain too.
    general = answers["data"][4:]
    assert [(a["prompt"], a["expected"]) for a in general] == GENERAL_QUESTIONS[:8]
    assert all(a["base"] != a["tuned"] for a in general) and any("order order" in a["tuned"] for a in general)
    assert quality["general"]["answered"] == 8 and quality["general"]["tuned"]["key_facts"] == 0.0
    assert first["prompt"].endswith("?") and first["base"] != first["tuned"]
    [figures] = [e.data for e in events if e.type == "metrics" and "exact_match" in e.data]
    assert figures["step"] == 2 and figures["exact_match"] == quality["tuned"]["exact_match"]
    assert any(m.startswith("Answers to 4 held-out prompts: exact match") and "General questions outside the domain "
               "(8, built in): all key facts stated" in m for m in messages)
    assert best.metrics.exact_match == quality["tuned"]["exact_match"]
    assert best.metrics.key_facts == quality["tuned"]["key_facts"]

    # The answers are a result file beside the metrics CSV.
    metrics_file, answers_file = done.result_files
    lines = openai_client.files.content(answers_file).text.splitlines()
    assert [json.loads(line)["tuned"] for line in lines] == [row["tuned"] for row in answers["data"]]

    # The job page shows them.
    page = job_page(stack, project_key.key, job.id)
    assert "Answers on held-out prompts" in page and "The adapter is the checkpoint of step <b>2</b>" in page
    assert "the last step was 8 (early stopping, then the learning rate cooled to 0 from the weights of step 2)" in page
    assert first["expected"] in page and "Exact match (base → tuned)" in page
    assert "exact_match <b>" in page  # on the delivered checkpoint's row
    assert "Outside the domain" in page and "General questions, all key facts" in page
    assert str(escape(GENERAL_QUESTIONS[0][1])) in page  # as Jinja escapes it


def test_answers_of_another_projects_job_are_not_found(openai_client, stack, settings):
    job = create_job(openai_client, processed_file(openai_client, support_dataset(12)))
    response = httpx.get(f"{stack.v1}/fine_tuning/jobs/{job.id}/answers",
                         headers={"Authorization": f"Bearer {make_project_key(settings).key}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    openai_client.fine_tuning.jobs.cancel(job.id)
