"""The Trainer callback that drives `TrainingHooks`."""

import os
import threading
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from worker.training.hooks import TrainingHooks
from worker.training.model import name_base_model
from worker.training.replay import Replay


class HooksCallback(TrainerCallback):
    """Turns Trainer events into hook calls; evaluates every `eval_steps`; stops when `should_stop()` says so."""

    def __init__(
        self, hooks: TrainingHooks, evaluate: Callable[[object], dict | None], eval_steps: int | None, base_model_id: str,
        save_every_seconds: float | None = None, replay: Replay | None = None,
    ):
        self.hooks = hooks
        self.base_model_id = base_model_id
        self.evaluate = evaluate
        self.eval_steps = eval_steps
        self.save_every_seconds = save_every_seconds  # a checkpoint by time too: a crash costs minutes, not an epoch
        self.replay = replay  # stored with every checkpoint, for a resumed job to train on the same answers
        self.cancelled = False
        self.last_metrics: dict = {}
        self._start_time = 0.0
        self._start_step = 0
        self._start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen
        self._last_save = self._start_time
        self._saved_step = None

    def on_step_end(self, args, state, control, **kwargs):
        _inject_test_faults(state.global_step, args.per_device_train_batch_size)
        stop = self.hooks.should_stop() if self.hooks.should_stop else None
        if stop:
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True  # the checkpoint a resumed or inspected job starts from
            reason = stop if isinstance(stop, str) else "Cancellation requested"
            self.hooks.event("info", f"{reason}: stopping at step {state.global_step}.")
        elif (self.save_every_seconds and state.global_step < state.max_steps
              and time.monotonic() - self._last_save >= self.save_every_seconds):
            control.should_save = True

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        self.last_metrics = {"step": step, "train_loss": logs["loss"], "learning_rate": logs["learning_rate"]}
        if self.hooks.on_metrics:
            self.hooks.on_metrics(dict(self.last_metrics))
        self._report_progress(state, logs)
        if self.eval_steps and step % self.eval_steps == 0 and step < state.max_steps and not self.cancelled:
            self._evaluate(state, model)

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()
        if state.global_step == self._saved_step:  # a step that is also an epoch's end is saved twice by the Trainer
            return
        self._saved_step = state.global_step
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        name_base_model(path, self.base_model_id)
        if self.replay is not None:
            self.replay.save(path)
        self.hooks.event("info", f"Checkpoint saved at step {state.global_step}.")
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(state.global_step, path, dict(self.last_metrics))

    def _evaluate(self, state, model) -> None:
        result = self.evaluate(model)
        if result is None:
            return
        metrics = {"step": state.global_step, "valid_loss": result["loss"], "valid_mean_token_accuracy": result["token_accuracy"]}
        self.last_metrics.update(metrics)
        state.log_history.append(dict(metrics))  # saved with each checkpoint, so a resumed log keeps it
        if self.hooks.on_metrics:
            self.hooks.on_metrics(metrics)

    def _report_progress(self, state, logs: dict) -> None:
        if not self.hooks.on_progress:
            return
        elapsed = max(time.monotonic() - self._start_time, 1e-9)
        steps_done = state.global_step - self._start_step
        remaining = state.max_steps - state.global_step
        self.hooks.on_progress({
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            "loss": logs["loss"],
            "learning_rate": logs["learning_rate"],
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_second": (state.num_input_tokens_seen - self._start_tokens) / elapsed,
            "eta_seconds": elapsed / steps_done * remaining if steps_done else None,
        })


TEST_FAULT_OOM_AT_STEP = "LORAJOBS_TEST_FAULT_OOM_AT_STEP"
TEST_FAULT_HANG_AT_STEP = "LORAJOBS_TEST_FAULT_HANG_AT_STEP"


def _inject_test_faults(step: int, micro_batch_size: int) -> None:
    """Tests only (docs/configuration.md): a real `torch.OutOfMemoryError` at step N while the micro-batch is above
    1, so the OOM recovery runs end to end on a machine without a GPU; or a training thread that hangs at step N
    (as on a stuck collective) while the process lives, for the watchdog."""
    at = os.environ.get(TEST_FAULT_OOM_AT_STEP)
    if at and step == int(at) and micro_batch_size > 1:
        import torch

        raise torch.OutOfMemoryError(f"{TEST_FAULT_OOM_AT_STEP}={at}: injected at micro-batch {micro_batch_size}")
    hang = os.environ.get(TEST_FAULT_HANG_AT_STEP)
    if hang and step == int(hang):
        threading.Event().wait()
