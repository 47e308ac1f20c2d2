"""`train` end to end on the tiny model: artifacts, hooks, reload, merge, determinism, cancel and exact resume."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import InvalidRequest
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import TINY, tiny_spec, write_jsonl
from worker.training import TrainingHooks, merge_adapter, train
from worker.training.model import load_adapter_model

PROMPT = "<|im_start|>user\nWhere is my order 7?<|im_end|>\n<|im_start|>assistant\n"


class Recorder:
    """Hooks that record every call, and check each checkpoint is complete when it is announced."""

    def __init__(self, stop_at_step: int | None = None):
        self.progress, self.metrics, self.checkpoints, self.events, self.parameters = [], [], [], [], []
        self.stop_at_step = stop_at_step
        self.stop_checks = 0

    def hooks(self) -> TrainingHooks:
        return TrainingHooks(on_progress=self.progress.append, on_metrics=self.metrics.append,
                             on_checkpoint=self._checkpoint, on_event=lambda *e: self.events.append(e),
                             should_stop=self._should_stop, on_parameters=self.parameters.append)

    def _checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        files = {p.name for p in path.iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
        self.checkpoints.append((step, path, metrics))

    def _should_stop(self) -> bool:
        """Asked at every step end: answers yes from the `stop_at_step`-th step on."""
        self.stop_checks += 1
        return self.stop_at_step is not None and self.stop_checks >= self.stop_at_step


def read_log(out_dir: Path) -> list[dict]:
    with open(out_dir / "training_log.csv") as log:
        return list(csv.DictReader(log))


def train_losses(out_dir: Path) -> dict[int, float]:
    return {int(row["step"]): float(row["train_loss"]) for row in read_log(out_dir) if row["train_loss"]}


def logits_of(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def lora_run(models_dir, chat_files, tmp_path_factory):
    """One LoRA run with a validation file, evaluations and checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("lora_run")
    recorder = Recorder()
    spec = tiny_spec(eval_steps=2, save_steps=2, save_total_limit=2)
    result = train(spec, chat_files[0], chat_files[1], out, recorder.hooks(), models_dir=models_dir)
    return result, out, recorder


def test_a_run_writes_a_standard_adapter_named_by_catalogue_id(lora_run, chat_files):
    result, out, _ = lora_run
    assert result.status == "succeeded" and result.steps == result.total_steps == 5
    assert result.adapter_dir == out / "adapter"
    assert {p.name for p in result.adapter_dir.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "README.md",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # the template it was trained with
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY and config["modules_to_save"] is None
    card = (result.adapter_dir / "README.md").read_text()
    import hashlib

    assert f"base_model: {TINY}" in card and hashlib.sha256(chat_files[0].read_bytes()).hexdigest() in card
    assert f"{result.final_eval['loss']:.4f}" in card and "transformers" in card and '"r": 8' in card


def test_the_result_reports_evaluations_and_hyperparameters_as_json(lora_run):
    result, _, _ = lora_run
    data = json.loads(json.dumps(result.to_dict()))
    assert data["final_eval"]["loss"] < data["baseline_eval"]["loss"]
    assert 0 <= data["final_eval"]["token_accuracy"] <= 1
    assert data["hyperparameters"]["batch_size"] == 4 and data["hyperparameters"]["learning_rate"] == 1e-2
    assert data["n_train_examples"] == 20 and data["n_valid_examples"] == 6
    assert data["dropped_examples"] == {"count": 0, "reasons": {}} and data["trained_tokens"] > 0
    assert set(data["library_versions"]) >= {"torch", "transformers", "peft"}


def test_the_result_reports_the_parameter_counts_peft_reports_for_the_adapter(lora_run, models_dir):
    result, _, recorder = lora_run
    reloaded = dict(load_adapter_model(result.adapter_dir, models_dir).named_parameters())
    trainable = sum(p.numel() for name, p in reloaded.items() if "lora_" in name)
    total = sum(p.numel() for p in reloaded.values())
    # r=8 on q_proj (64->64) and v_proj (64->32) in 2 layers: 2 * 8 * ((64 + 64) + (64 + 32)).
    assert trainable == 2 * 8 * (128 + 96) == result.parameters["trainable_parameters"]
    assert result.parameters["total_parameters"] == total
    assert result.parameters["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-4)
    assert recorder.parameters == [result.parameters]  # reported when the adapter is attached, before training
    card = (result.adapter_dir / "README.md").read_text()
    assert f"trainable: {trainable:,} of {total:,}" in card and "Chat template: `model`" in card


def test_hooks_see_progress_metrics_and_complete_checkpoints(lora_run):
    result, out, recorder = lora_run
    assert [p["step"] for p in recorder.progress] == [1, 2, 3, 4, 5]
    last = recorder.progress[-1]
    assert set(last) == {"step", "total_steps", "epoch", "loss", "learning_rate", "tokens_seen", "tokens_per_second",
                         "eta_seconds"}
    assert last["total_steps"] == 5 and last["tokens_seen"] == result.trained_tokens and last["eta_seconds"] == 0
    assert [m["step"] for m in recorder.metrics if "valid_loss" in m] == [2, 4, 5]
    assert [step for step, _, _ in recorder.checkpoints] == [2, 4, 5]  # the last step is always checkpointed
    step2_eval = next(m for m in recorder.metrics if m["step"] == 2 and "valid_loss" in m)
    assert recorder.checkpoints[0][2] == {"step": 2, "train_loss": pytest.approx(recorder.progress[1]["loss"]),
                                          "learning_rate": pytest.approx(recorder.progress[1]["learning_rate"]),
                                          "valid_loss": step2_eval["valid_loss"],
                                          "valid_mean_token_accuracy": step2_eval["valid_mean_token_accuracy"]}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_the_training_log_has_one_row_per_step(lora_run):
    _, out, _ = lora_run
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["train_loss"] and r["learning_rate"] and r["tokens_seen"] for r in rows)
    assert [int(r["step"]) for r in rows if r["valid_loss"]] == [2, 4, 5]


def test_the_adapter_reloads_in_a_fresh_process_with_identical_logits(lora_run, models_dir, tokenizer, tmp_path):
    result, _, _ = lora_run
    script = (
        "import sys, torch; from pathlib import Path; from worker.training.model import load_adapter_model\n"
        "from transformers import AutoTokenizer\n"
        f"model = load_adapter_model(Path({str(result.adapter_dir)!r}), Path({str(models_dir)!r})).eval()\n"
        f"tok = AutoTokenizer.from_pretrained(Path({str(models_dir)!r}) / {TINY!r})\n"
        f"with torch.no_grad(): torch.save(model(**tok({PROMPT!r}, return_tensors='pt')).logits, {str(tmp_path / 'l.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[3])
    here = logits_of(load_adapter_model(result.adapter_dir, models_dir).eval(), tokenizer)
    assert torch.equal(torch.load(tmp_path / "l.pt"), here)


def test_the_reloaded_adapter_scores_what_training_measured(lora_run, models_dir, tokenizer, chat_files):
    from worker.training.data import make_collator, read_examples, tokenize_all
    from worker.training.evaluate import evaluate_model

    result, _, _ = lora_run
    rows = tokenize_all(read_examples(chat_files[1]), tokenizer, 128, False).rows
    scores = evaluate_model(load_adapter_model(result.adapter_dir, models_dir), rows, make_collator(True, tokenizer), 4)
    assert scores["loss"] == pytest.approx(result.final_eval["loss"], rel=1e-5)


def test_the_merged_model_matches_the_adapter(lora_run, models_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    result, _, _ = lora_run
    merged_dir = merge_adapter(result.adapter_dir, tmp_path / "merged", models_dir)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = logits_of(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), tokenizer)
    adapter = logits_of(load_adapter_model(result.adapter_dir, models_dir).eval(), tokenizer)
    base = logits_of(AutoModelForCausalLM.from_pretrained(models_dir / TINY).eval(), tokenizer)
    assert torch.allclose(merged, adapter, atol=1e-5) and not torch.allclose(base, adapter, atol=1e-3)


def test_the_same_seed_gives_the_same_losses(lora_run, models_dir, chat_files, tmp_path):
    _, first, _ = lora_run
    spec = tiny_spec(save_steps=10)
    train(spec, chat_files[0], chat_files[1], tmp_path / "again", models_dir=models_dir)
    train(spec.model_copy(update={"seed": 1}), chat_files[0], chat_files[1], tmp_path / "seed1", models_dir=models_dir)
    assert train_losses(tmp_path / "again") == train_losses(first)
    assert train_losses(tmp_path / "seed1") != train_losses(first)


def test_neftune_noises_the_embeddings_while_training(lora_run, models_dir, chat_files, tmp_path):
    noised, noised_dir, _ = lora_run
    assert tiny_spec().neftune_noise_alpha == 5.0  # on by default
    first = train(tiny_spec(eval_steps=2, save_steps=2, save_total_limit=2, neftune_noise_alpha=None), chat_files[0],
                  chat_files[1], tmp_path, models_dir=models_dir)
    losses, clean = train_losses(noised_dir), train_losses(tmp_path)
    assert losses[1] != clean[1]  # the same seed and rows: the first step differs only by the noise
    # The baseline evaluation, before training, runs without the noise: the plain run's loss to the last digit.
    assert noised.baseline_eval["loss"] == first.baseline_eval["loss"]


def test_cancel_stops_within_a_step_and_a_resumed_run_matches_an_uninterrupted_one(models_dir, chat_files, tmp_path):
    spec = tiny_spec(n_epochs=2, save_steps=3)
    whole = train(spec, chat_files[0], chat_files[1], tmp_path / "whole", models_dir=models_dir)
    recorder = Recorder(stop_at_step=4)
    cancelled = train(spec, chat_files[0], chat_files[1], tmp_path / "cut", recorder.hooks(), models_dir=models_dir)
    assert cancelled.status == "cancelled" and cancelled.steps == 4 and cancelled.total_steps == whole.total_steps == 10
    assert cancelled.final_eval is None and (cancelled.adapter_dir / "adapter_model.safetensors").is_file()
    assert recorder.checkpoints[-1][0] == 4
    resumed = train(spec, chat_files[0], chat_files[1], tmp_path / "resumed", models_dir=models_dir,
                    resume_from=tmp_path / "cut" / "checkpoints" / "checkpoint-4")
    assert resumed.status == "succeeded" and resumed.steps == 10
    uninterrupted, continued = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert sorted(continued) == list(range(1, 11))
    for step, loss in uninterrupted.items():
        assert continued[step] == pytest.approx(loss, rel=0.01), step
    assert resumed.final_eval["loss"] == pytest.approx(whole.final_eval["loss"], rel=0.01)


def test_qlora_end_to_end_evaluates_base_and_adapter_without_the_trap(models_dir, chat_files, tmp_path):
    result = train(tiny_spec(quantization="nf4", eval_steps=2), chat_files[0], chat_files[1], tmp_path, models_dir=models_dir)
    assert result.status == "succeeded" and result.steps == 5
    assert result.final_eval["loss"] < result.baseline_eval["loss"]
    assert [int(r["step"]) for r in read_log(tmp_path) if r["valid_loss"]] == [2, 4, 5]
    served = result.served_eval
    assert set(served) == {"adapter_on_full_precision_base", "merged_full_precision", "merged_dequantized_4bit",
                           "merge_base"}
    # Merging into a base is the adapter on that base: the full-precision pair agrees.
    assert served["merged_full_precision"]["loss"] == pytest.approx(
        served["adapter_on_full_precision_base"]["loss"], rel=1e-4)
    # The dequantized 4-bit base is the base the adapter trained on: its merge scores what training measured.
    assert served["merged_dequantized_4bit"]["loss"] == pytest.approx(result.final_eval["loss"], rel=2e-2)
    better = min(("full_precision", "merged_full_precision"), ("dequantized_4bit", "merged_dequantized_4bit"),
                 key=lambda pair: served[pair[1]]["loss"])[0]
    assert served["merge_base"] == better
    card = (result.adapter_dir / "README.md").read_text()
    assert "merged into the dequantized 4-bit base" in card and "adapter on the full-precision base" in card


def test_quantization_auto_trains_over_the_16_bit_base_where_this_machine_holds_it(models_dir, chat_files, tmp_path):
    recorder = Recorder()
    result = train(tiny_spec(quantization="auto"), chat_files[0], chat_files[1], tmp_path, recorder.hooks(),
                   models_dir=models_dir)
    assert result.status == "succeeded" and result.served_eval is None  # no 4-bit base to serve apart from
    chosen = [message for _, message in recorder.events if message.startswith("quantization 'auto'")]
    assert len(chosen) == 1 and chosen[0].startswith(
        "quantization 'auto' chose 'none' (LoRA on the 16-bit base): it fits cpu (predicted ")
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert "4-bit" not in (result.adapter_dir / "README.md").read_text()


def test_a_bf16_run_says_where_it_attends_in_float32_in_its_events_and_model_card(models_dir, chat_files, tmp_path,
                                                                                  monkeypatch):
    from core.settings import get_settings

    monkeypatch.setenv("LORAJOBS_CPU_COMPUTE", "bfloat16")  # the base in bf16 weights, as the probe chooses on some CPUs
    get_settings.cache_clear()
    try:
        recorder = Recorder()
        result = train(tiny_spec(n_epochs=1), chat_files[0], None, tmp_path, recorder.hooks(), models_dir=models_dir)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.status == "succeeded"
    started = [message for _, message in recorder.events if message.startswith("Training ")]
    assert "base and compute in bfloat16 (as LORAJOBS_CPU_COMPUTE asks); attention in float32 for " in started[0]
    assert "64 tokens: float32 " in started[0]
    assert f"Compute: {result.compute}." in (result.adapter_dir / "README.md").read_text()
    assert "attention in float32 for" in result.compute


def test_examples_without_a_trained_token_are_dropped_and_counted(models_dir, tmp_path):
    untrained = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey", "weight": 0}]}
    data = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(8) + [untrained] * 3)
    result = train(tiny_spec(validation_fraction=0.0), data, None, tmp_path / "out", models_dir=models_dir)
    assert result.dropped_examples == {"count": 3, "reasons": {"training: no trained token": 3}}
    assert result.n_train_examples == 8 and result.baseline_eval is None


def test_a_dataset_with_nothing_to_train_is_refused_naming_the_field(models_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(4))
    with pytest.raises(InvalidRequest) as error:
        train(tiny_spec(max_seq_length=16), data, None, tmp_path / "out", models_dir=models_dir)
    assert error.value.param == "max_seq_length"
