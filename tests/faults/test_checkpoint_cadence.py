"""Checkpoints by time as well as by steps: a crash of a one-epoch job costs minutes of training, not the epoch."""

from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import tiny_spec, write_jsonl
from worker.training import TrainingHooks, train


def _checkpoint_steps(models_dir, tmp_path, save_every_seconds):
    data = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    steps = []
    hooks = TrainingHooks(on_checkpoint=lambda step, path, metrics: steps.append(step))
    result = train(tiny_spec(n_epochs=2), data, None, tmp_path / f"out-{save_every_seconds}", hooks,
                   models_dir=models_dir, save_every_seconds=save_every_seconds)
    return steps, result.total_steps


def test_a_time_cadence_checkpoints_between_the_epochs_checkpoints(models_dir, tmp_path):
    by_epoch, total = _checkpoint_steps(models_dir, tmp_path, None)
    assert len(by_epoch) == 2 and by_epoch[-1] == total  # the spec's default: each epoch's end
    by_time, _ = _checkpoint_steps(models_dir, tmp_path, 1e-6)  # every step's end is "due"
    assert by_time == list(range(1, total + 1))
