"""Early stopping cools the learning rate before it stops (worker/training/best.py), on the tiny model."""

import pytest

from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import tiny_spec, write_jsonl
from tests.worker.training.test_train import Recorder, train_losses
from worker.training import train

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
