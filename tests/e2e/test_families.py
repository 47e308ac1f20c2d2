"""A new user registers a model of another family and trains it through the `openai` SDK and the real worker."""

import io
import json
import subprocess
import sys
import tarfile
import uuid

import openai
import pytest

from tests.conftest import FAMILY_ORG
from tests.e2e.jobs_helpers import processed_file, wait_status
from tests.stack import ROOT

SYSTEM = "You are the booking assistant of a small hotel."
STAYS = [("Monday", 2, 180), ("Friday", 3, 290), ("Sunday", 1, 95), ("Tuesday", 4, 360)]


def hotel_chats(n: int) -> bytes:
    rows = []
    for i in range(n):
        day, nights, price = STAYS[i % len(STAYS)]
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"How much are {nights} nights from {day}, room {100 + i}?"},
            {"role": "assistant", "content": f"Room {100 + i}: {nights} nights from {day} cost {price} euros."},
        ]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def register(family: str, family_catalogue, settings) -> str:
    """`lorajobs models add` of the family's folder under a fresh id, as a user would."""
    model_id = f"team-{uuid.uuid4().hex[:6]}/{family}"
    done = subprocess.run([sys.executable, "-m", "cli.main", "models", "add", model_id,
                           str(family_catalogue / FAMILY_ORG / family), "--models-dir", str(settings.models_dir)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return model_id


@pytest.mark.parametrize(("family", "template"), [("llama2", "plain"), ("mistral", "model")])
def test_a_registered_family_model_trains_on_chats_with_system_prompts(
        openai_client, http, stack, family_catalogue, family, template, tmp_path):
    model_id = register(family, family_catalogue, stack.settings)
    assert model_id in {m.id for m in openai_client.models.list()}
    training_file = processed_file(openai_client, hotel_chats(24))
    report = openai_client.get(f"/files/{training_file}/report", cast_to=object)["report"]
    assert report["token_stats"][model_id]["count"] == 24  # counted with this model's own template

    job = openai_client.fine_tuning.jobs.create(
        model=model_id, training_file=training_file, suffix="hotel",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        extra_body={"quantization": "none", "lora": {"r": 4, "target_modules": "attention"}, "max_seq_length": 96,
                    "learning_rate": 1e-2, "validation_fraction": 0.2})
    done = wait_status(openai_client, job.id)
    assert done.status == "succeeded", done.error
    assert done.model_extra["chat_template"] == template
    assert done.model_extra["final_eval_loss"] < done.model_extra["baseline_eval_loss"]

    archive = http.get(f"fine_tuning/jobs/{job.id}/adapter", params={"redirect": "false"})
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(stack.settings.models_dir / model_id)
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    weights = dict(tuned.named_parameters())
    assert done.model_extra["trainable_parameters"] == sum(p.numel() for n, p in weights.items() if "lora_" in n)
    assert done.model_extra["total_parameters"] == sum(p.numel() for p in weights.values())
    # The adapter carries the template it was trained with: a server renders prompts exactly as training did.
    served = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    prompt = served.apply_chat_template([{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": "How much are 2 nights from Monday?"}],
                                        tokenize=False, add_generation_prompt=True)
    assert SYSTEM in prompt and (prompt.endswith("### Assistant:\n") if template == "plain" else "[/INST]" in prompt)


@pytest.mark.parametrize(("family", "extra", "param", "code"), [
    ("llama2", {"chat_template": "model"}, "chat_template", "no_chat_template"),
    ("falcon", {"quantization": "nf4"}, "quantization", "quantization_unsupported"),
    ("phi3", {"lora": {"target_modules": ["q_proj", "v_proj"]}}, "lora.target_modules", "invalid_target_modules"),
])
def test_an_unsupported_combination_is_a_400_at_creation_that_says_what_to_change(
        openai_client, stack, family_catalogue, family, extra, param, code):
    model_id = register(family, family_catalogue, stack.settings)
    training_file = processed_file(openai_client, hotel_chats(12))
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.fine_tuning.jobs.create(model=model_id, training_file=training_file, extra_body=extra)
    error = refused.value.body
    assert (error["param"], error["code"]) == (param, code)
    if family == "phi3":
        assert "qkv_proj, o_proj, gate_up_proj, down_proj" in error["message"]
    assert openai_client.fine_tuning.jobs.list().data == []

