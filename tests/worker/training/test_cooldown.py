"""Early stopping cools the learning rate before it stops (worker/training/best.py), on the tiny model."""

import shutil

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import tiny_spec, write_jsonl
from tests.worker.training.test_answers import drifting_records
from tests.worker.training.test_train import Recorder, train_losses
from worker.training import train
from worker.training.best import rewind
from worker.training.model import attach_adapter, load_base_model

# A threshold of a whole nat: the second epoch improves, but by less than counts, so patience 1 runs out at step 10
# of 20; a fifth of those 10 steps is the cooldown.
SPEC = dict(n_epochs=4, early_stopping_patience=1, early_stopping_threshold=1.0, answer_samples=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cooldown")
    return (write_jsonl(root / "train.jsonl", retail_chat_records(20)),
            write_jsonl(root / "valid.jsonl", retail_chat_records(6, offset=50)))


@pytest.fixture(scope="module")
def cooled(files, models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cooled")
    recorder = Recorder()
    return train(tiny_spec(**SPEC), *files, out, recorder.hooks(), models_dir=models_dir), recorder, out


def rates(recorder: Recorder) -> dict[int, float]:
    """The learning rate each step trained at, as the Trainer logged it."""
    return {m["step"]: m["learning_rate"] for m in recorder.metrics if "learning_rate" in m}


def test_the_rate_falls_linearly_to_zero_and_the_cooled_weights_are_evaluated(cooled):
    result, recorder, _ = cooled
    evaluated = {m["step"]: m["valid_loss"] for m in recorder.metrics if "valid_loss" in m}
    assert sorted(evaluated) == [5, 10, 12]
    lr = rates(recorder)
    assert sorted(lr) == list(range(1, 13))
    # Until step 10 the linear schedule over 20 steps; then from its value at step 10 straight down to 0 at step 12.
    # The linear schedule over 20 steps up to step 11; then from there linearly to 0, which the 13th step would reach.
    assert lr[10] - lr[11] == pytest.approx(lr[9] - lr[10]) and lr[12] == pytest.approx(lr[11] / 2)
    best = min(evaluated, key=evaluated.get)
    assert result.status == "succeeded" and result.steps == 12 and result.total_steps == 20
    assert result.best_checkpoint == {"step": best, "metric": "valid_loss", "value": evaluated[best],
                                      "last_step": 12, "early_stopped": True, "cooled_from": 10}
    messages = [message for _, message in recorder.events]
    assert any(m.startswith("Early stopping at step 10 of 20") and "cooled to 0 over steps 10-12" in m
               for m in messages)


def test_a_job_resumed_in_its_cooldown_cools_the_same_way(cooled, files, models_dir, tmp_path):
    whole, whole_recorder, whole_out = cooled
    cut = train(tiny_spec(**SPEC), *files, tmp_path / "cut", Recorder(stop_at_step=11).hooks(), models_dir=models_dir)
    assert cut.status == "cancelled" and cut.steps == 11
    recorder = Recorder()
    resumed = train(tiny_spec(**SPEC), *files, tmp_path / "resumed", recorder.hooks(), models_dir=models_dir,
                    resume_from=tmp_path / "cut" / "checkpoints" / "checkpoint-11")
    # Without the cooldown restored it would train at the linear schedule's rate to step 20 (patience reset too).
    assert resumed.status == "succeeded" and resumed.steps == 12
    assert rates(recorder) == {12: rates(whole_recorder)[12]}
    assert resumed.best_checkpoint["cooled_from"] == 10 and resumed.best_checkpoint["last_step"] == 12
    assert train_losses(tmp_path / "resumed")[12] == pytest.approx(train_losses(whole_out)[12], rel=0.01)


def test_no_cooldown_stops_at_once(files, models_dir, tmp_path):
    result = train(tiny_spec(**SPEC, early_stopping_cooldown=0), *files, tmp_path, models_dir=models_dir)
    assert result.steps == 10 and result.best_checkpoint["cooled_from"] is None


def test_a_stop_asked_for_is_not_taken_for_early_stopping(files, models_dir, tmp_path):
    # A pause (or cancel, shutdown, lost lease) asked for mid-epoch: the Trainer ends the epoch there and evaluates
    # it. That evaluation must not start a cooldown, which would train on past the stop and, once resumed, cool and
    # stop a job whose patience never ran out (here held-out loss improves at every epoch: no early stop).
    spec = tiny_spec(n_epochs=4, early_stopping_patience=1, early_stopping_threshold=0.0, answer_samples=0)
    cut = train(spec, *files, tmp_path / "cut", Recorder(stop_at_step=3).hooks(), models_dir=models_dir)
    assert cut.status == "cancelled" and cut.steps == 3
    resumed = train(spec, *files, tmp_path / "resumed", Recorder().hooks(), models_dir=models_dir,
                    resume_from=tmp_path / "cut" / "checkpoints" / "checkpoint-3")
    assert resumed.steps == 20 and not resumed.best_checkpoint["early_stopped"]


def test_a_rewind_loads_weights_and_moments_but_keeps_the_schedules_rate(models_dir, tmp_path):
    spec = tiny_spec()
    model = attach_adapter(load_base_model(spec, models_dir, "cpu"), spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()

    for _ in range(3):
        step()
    model.save_pretrained(tmp_path / "checkpoint-3")
    torch.save(optimizer.state_dict(), tmp_path / "checkpoint-3" / "optimizer.pt")
    saved = {name: value.clone() for name, value in get_peft_model_state_dict(model).items()}
    for _ in range(4):
        step()
    rewind(tmp_path / "checkpoint-3", model, optimizer, schedule)
    now = get_peft_model_state_dict(model)
    assert all(torch.equal(now[name], value) for name, value in saved.items())
    assert all(state["step"] == 3 for state in optimizer.state.values())
    # The optimizer's saved groups carry step 3's rate (0.7 of the peak); the next step trains at step 7's (0.3).
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates == pytest.approx(schedule.get_last_lr()) and rates == pytest.approx([0.3e-2] * len(rates))


def test_a_job_resumed_elsewhere_fetches_its_best_checkpoint_cools_from_it_and_delivers_it(models_dir, tmp_path):
    # The worker dies in the cooldown: the newest stored checkpoint (step 10) is the one whose evaluation ran out
    # the patience, the best is step 5's, and the worker that resumes the job has neither folder of the first one.
    files = (write_jsonl(tmp_path / "train.jsonl", drifting_records(20)),
             write_jsonl(tmp_path / "valid.jsonl", retail_chat_records(6, offset=50)))
    spec = tiny_spec(n_epochs=4, early_stopping_patience=1, answer_samples=0)
    whole = train(spec, *files, tmp_path / "whole", models_dir=models_dir)
    assert whole.best_checkpoint["step"] == 5 and whole.best_checkpoint["cooled_from"] == 5
    stored = tmp_path / "stored"  # what object storage holds; the first worker's folders are gone
    shutil.move(tmp_path / "whole" / "checkpoints", stored)

    def resume(with_best: bool):
        work = tmp_path / f"resumed-{with_best}"
        shutil.copytree(stored / "checkpoint-10", work / "checkpoint-10")
        if with_best:
            shutil.copytree(stored / "checkpoint-5", work / "best-5")
        recorder = Recorder()
        result = train(spec, *files, work / "out", recorder.hooks(), models_dir=models_dir,
                       resume_from=work / "checkpoint-10", resume_best=work / "best-5" if with_best else None)
        return result, recorder, work / "out"

    resumed, _, out = resume(with_best=True)
    assert resumed.best_checkpoint == whole.best_checkpoint
    assert train_losses(out)[11] == pytest.approx(train_losses(tmp_path / "whole")[11], rel=1e-3)
    delivered = load_file(out / "adapter" / "adapter_model.safetensors")
    best = load_file(stored / "checkpoint-5" / "adapter_model.safetensors")
    assert all(torch.equal(delivered[name], best[name]) for name in best)

    # Without it (gone from storage), the job cools the weights at hand and says it delivers the last step's.
    alone, recorder, _ = resume(with_best=False)
    assert alone.best_checkpoint is None and alone.steps == 12
    assert any("was chosen before the job resumed and is not on this worker" in m for _, m in recorder.events)
