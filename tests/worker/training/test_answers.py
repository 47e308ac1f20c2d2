"""Answers side by side and the best checkpoint, on the tiny model."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.datasets.formats import Example, Turn
from core.general import GENERAL_QUESTIONS
from core.quality import score_answer
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import TINY, tiny_spec, write_jsonl
from worker.training import TrainingHooks, load_tokenizer, train
from worker.training.answers import _answer_or_warn, answer_side_by_side, general_prompts, sample_prompts
from worker.training.data import read_examples
from worker.training.model import attach_adapter, load_adapter_model, load_base_model


def chat(user: str, answer: str) -> Example:
    return Example("chat", (Turn("system", "Be brief.", False), Turn("user", user, False),
                            Turn("assistant", answer, True)))


def test_the_sample_is_fixed_by_the_seed_and_skips_what_has_no_question():
    examples = [chat(f"Price of item {i}?", f"Item {i} costs {i} euros.") for i in range(30)]
    examples.append(Example("text", text="A plain text example has no question to answer."))
    first = sample_prompts(examples, 20, seed=7)
    assert first == sample_prompts(examples, 20, seed=7) != sample_prompts(examples, 20, seed=8)
    assert len(first) == 20 and all(p.prompt.startswith("Price of item") for p in first)
    assert [m["role"] for m in first[0].messages] == ["system", "user"]
    assert len(sample_prompts(examples, 50, seed=7)) == 30


def test_answers_stop_at_the_token_bound_and_the_time_budget(models_dir, tokenizer):
    spec = tiny_spec()
    model = attach_adapter(load_base_model(spec, models_dir, "cpu"), spec)
    prompts = sample_prompts([chat(f"Where is parcel {i}?", f"Parcel {i} arrives in 3 days.") for i in range(10)],
                             10, seed=0)
    answered = answer_side_by_side(model, tokenizer, prompts, max_new_tokens=4, budget_seconds=0.0)
    # No second batch starts once the budget is spent, and both models answered every prompt of the first.
    assert answered["quality"]["sample"] == 10 and answered["quality"]["answered"] == 8 == len(answered["answers"])
    for row in answered["answers"]:
        assert len(tokenizer(row["tuned"], add_special_tokens=False)["input_ids"]) <= 4 + 1  # decoding may split one
        assert row["base_score"] == score_answer(row["base"], row["expected"], row["prompt"])
        assert row["tuned_score"] == score_answer(row["tuned"], row["expected"], row["prompt"])
    # Every expected answer has a key fact ("3 days") but parcel 3's, whose question already states the 3.
    with_facts = sum("parcel 3?" not in row["prompt"] for row in answered["answers"])
    assert answered["quality"]["tuned"]["answers"] == 8 and answered["quality"]["base"]["answers_with_facts"] == with_facts


def drifting_records(n: int) -> list[dict]:
    """Training chats whose answers are one repeated word: the longer it trains, the worse real answers score."""
    return [{"messages": [{"role": "user", "content": f"Where is my order {i}?"},
                          {"role": "assistant", "content": "order " * 12}]} for i in range(n)]


@pytest.fixture(scope="module")
def drifting_run(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    train_file = write_jsonl(root / "train.jsonl", drifting_records(20))
    valid_file = write_jsonl(root / "valid.jsonl", retail_chat_records(6, offset=50))
    events, metrics = [], []
    spec = tiny_spec(n_epochs=4, early_stopping_patience=1, answer_samples=4, answer_max_new_tokens=8,
                     save_total_limit=1)
    result = train(spec, train_file, valid_file, root / "out", TrainingHooks(
        on_event=lambda level, message: events.append(message), on_metrics=metrics.append), models_dir=models_dir)
    return result, events, metrics, root / "out"


def test_an_improvement_under_the_threshold_stops_early_but_the_best_checkpoint_is_still_delivered(
        models_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", retail_chat_records(6, offset=50))
    metrics = []
    # a threshold of a whole nat: the second epoch improves (the lowest loss), but by less than it counts
    spec = tiny_spec(n_epochs=4, early_stopping_patience=1, early_stopping_threshold=1.0, early_stopping_cooldown=0,
                     answer_samples=0)
    result = train(spec, train_file, valid_file, tmp_path / "out", TrainingHooks(on_metrics=metrics.append),
                   models_dir=models_dir)
    evaluated = {m["step"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    assert sorted(evaluated) == [5, 10] and evaluated[10] < evaluated[5] < evaluated[10] + 1.0
    assert result.best_checkpoint == {"step": 10, "metric": "valid_loss", "value": evaluated[10], "last_step": 10,
                                      "early_stopped": True, "cooled_from": None}


def test_validation_that_gets_worse_stops_early_and_delivers_the_best_checkpoint(drifting_run):
    result, events, metrics, out = drifting_run
    evaluated = {m["step"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    # One checkpoint per epoch, each evaluated; patience 1 runs out at the second (worse than the first). Then the
    # learning rate cools over a fifth of the 10 steps trained, from step 5's weights (the best), and the cooled
    # weights are evaluated too: near step 5's loss, not step 10's, but still drifting, so the best stays step 5.
    assert sorted(evaluated) == [5, 10, 12]
    assert evaluated[10] > evaluated[12] > evaluated[5] and evaluated[12] - evaluated[5] < evaluated[10] - evaluated[12]
    assert result.status == "succeeded" and result.steps == 12 and result.total_steps == 20
    assert result.best_checkpoint == {"step": 5, "metric": "valid_loss", "value": evaluated[5], "last_step": 12,
                                      "early_stopped": True, "cooled_from": 5}
    assert result.final_eval["loss"] == pytest.approx(evaluated[5], rel=1e-6)
    assert any(m.startswith("Early stopping at step 10 of 20") and "cooled to 0 over steps 10-12, from the weights "
               "of step 5 (the best before it)" in m
               and "checkpoint of step 5" in m for m in events)
    # save_total_limit 1 keeps the best, and the delivered adapter is exactly its weights.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-5"]
    delivered = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    best = load_file(out / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors")
    assert delivered.keys() == best.keys() and all((delivered[k] == best[k]).all() for k in best)
    card = (Path(result.adapter_dir) / "README.md").read_text()
    assert ("The adapter is the checkpoint of step 5 (the last step was 12; early stopping, then the learning rate "
            "cooled to 0 from the weights of step 5), the best by valid_loss") in card


def test_a_job_with_validation_answers_its_sample_with_base_and_tuned(drifting_run):
    result, events, metrics, out = drifting_run
    held_out = [row for row in result.answers if row["part"] == "held_out"]
    assert result.quality["sample"] == result.quality["answered"] == 4 == len(held_out)
    assert result.answers[:4] == held_out  # the held-out sample first, then the general questions
    assert {"prompt", "expected", "base", "tuned", "base_score", "tuned_score"} <= set(held_out[0])
    assert all(row["base"] != row["tuned"] for row in held_out)  # the adapter changed what it says
    [figures] = [m for m in metrics if "exact_match" in m]  # beside the loss metrics, at the delivered step
    assert figures.keys() == {"step", "exact_match", "key_facts", "fact_recall", "base_exact_match", "base_key_facts",
                              "base_fact_recall"}
    assert figures["step"] == 5 and figures["exact_match"] == figures["key_facts"] == 0.0
    assert any(m.startswith("Answers to 4 held-out prompts: exact match 0/4 → 0/4") for m in events)
    assert "Answers to 4 held-out prompts" in (Path(result.adapter_dir) / "README.md").read_text()


def test_general_questions_outside_the_domain_show_what_the_adapter_forgot(drifting_run):
    """The drifting adapter answers "order order …" to anything: the general questions show it outside the domain,
    which the held-out prompts of the domain cannot."""
    result, events, metrics, out = drifting_run
    general = [row for row in result.answers if row["part"] == "general"]
    assert [(row["prompt"], row["expected"]) for row in general] == GENERAL_QUESTIONS[:8]  # the default 8, in order
    assert all(row["tuned"].split()[0] == "order" and row["base"] != row["tuned"] for row in general)
    figures = result.quality["general"]
    assert figures["sample"] == figures["answered"] == 8 and figures["tuned"]["key_facts"] == 0.0
    assert figures["base"]["answers_with_facts"] == 8  # every expected answer has a number or a quoted word
    line = next(m for m in events if m.startswith("Answers to 4 held-out prompts"))
    assert line.endswith(f"General questions outside the domain (8, built in): all key facts stated "
                         f"{round(figures['base']['key_facts'] * 8)}/8 → 0/8.")
    assert line.split("General")[1] in (Path(result.adapter_dir) / "README.md").read_text()


def test_general_questions_share_the_time_budget_and_always_answer_a_batch(models_dir, tokenizer):
    spec = tiny_spec()
    model = attach_adapter(load_base_model(spec, models_dir, "cpu"), spec)
    prompts = sample_prompts([chat(f"Where is parcel {i}?", f"Parcel {i} arrives in 3 days.") for i in range(12)], 12,
                             seed=0)
    events = []
    hooks = TrainingHooks(on_event=lambda level, message: events.append(message))
    # A budget spent at once: each part still answers its first batch of 8, held-out first.
    spent = _answer_or_warn(model, hooks=hooks, general=general_prompts(10), tokenizer=tokenizer, prompts=prompts,
                            max_new_tokens=2, budget_seconds=0.0)
    assert [row["part"] for row in spent["answers"]] == ["held_out"] * 8 + ["general"] * 8
    assert spent["quality"]["answered"] == 8 and spent["quality"]["general"]["answered"] == 8
    assert spent["quality"]["general"]["sample"] == 10 and spent["quality"]["general"]["max_new_tokens"] == 2
    both = _answer_or_warn(model, hooks=hooks, general=general_prompts(2), tokenizer=tokenizer, prompts=prompts[:3],
                           max_new_tokens=2, budget_seconds=600.0)
    assert [row["part"] for row in both["answers"]] == ["held_out"] * 3 + ["general"] * 2
    assert both["answers"][3]["prompt"] == GENERAL_QUESTIONS[0][0] and both["quality"]["general"]["answered"] == 2
    assert both["quality"]["answered"] == 3 and both["quality"]["tuned"]["answers"] == 3  # the domain's figures alone
    assert events == []


def test_no_validation_data_means_no_answers_and_the_last_weights(models_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    result = train(tiny_spec(validation_fraction=0.0), train_file, None, tmp_path / "out", models_dir=models_dir)
    assert result.status == "succeeded" and result.steps == result.total_steps == 5
    assert result.best_checkpoint is None and result.quality is None and result.answers is None


def test_a_qlora_job_answers_with_its_adapter_as_served_on_the_full_precision_base(models_dir, chat_files, tmp_path):
    train_file, valid_file = chat_files
    spec = tiny_spec(quantization="nf4", answer_samples=3, answer_max_new_tokens=6)
    result = train(spec, train_file, valid_file, tmp_path / "out", models_dir=models_dir)
    served = load_adapter_model(result.adapter_dir, models_dir)  # what vLLM, TGI or PEFT load: no 4-bit base
    prompts = sample_prompts(read_examples(valid_file), 3, spec.seed)
    again = answer_side_by_side(served, load_tokenizer(TINY, models_dir), prompts, 6, budget_seconds=float("inf"))
    held_out = [row for row in result.answers if row["part"] == "held_out"]
    assert [row["tuned"] for row in held_out] == [row["tuned"] for row in again["answers"]]
    assert [row["base"] for row in held_out] == [row["base"] for row in again["answers"]]
