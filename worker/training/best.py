"""Best checkpoint, not last: evaluate every checkpoint, deliver the best, stop when it stops improving.

transformers does the bookkeeping (`load_best_model_at_end`, `metric_for_best_model`, `EarlyStoppingCallback`,
and a `save_total_limit` that never deletes the best); the evaluation it runs at each checkpoint is ours
(token loss and accuracy on trained tokens, worker/training/evaluate.py), reported through the hooks like every
other evaluation, so the checkpoint's metrics carry it.
"""

import json
import math
import shutil
from functools import cache
from pathlib import Path

from worker.training.hooks import TrainingHooks

# The spec's metric -> (the Trainer's metric name, whether higher is better).
METRICS = {"valid_loss": ("eval_loss", False), "valid_mean_token_accuracy": ("eval_mean_token_accuracy", True)}


def selection_arguments(spec, has_validation: bool) -> dict:
    """TrainingArguments that evaluate at every checkpoint and load the best at the end; none without validation."""
    if not has_validation:
        return {}
    name, higher = METRICS[spec.best_checkpoint_metric]
    return {"eval_strategy": "steps" if spec.save_steps else "epoch", "eval_steps": spec.save_steps,
            "load_best_model_at_end": True, "metric_for_best_model": name, "greater_is_better": higher,
            # a resumed job keeps early stopping's patience count and cooldown (saved in every checkpoint)
            "restore_callback_states_from_checkpoint": True}


def selection_callbacks(spec, has_validation: bool) -> list:
    if not has_validation or spec.early_stopping_patience is None:
        return []
    return [cooling_early_stopping()(early_stopping_patience=spec.early_stopping_patience,
                                     early_stopping_threshold=spec.early_stopping_threshold,
                                     cooldown=spec.early_stopping_cooldown)]


class CooldownSchedule:
    """The learning-rate factor of a cooldown: `factor` at step `start`, falling linearly to 0 at step `end`.

    A callable object rather than a closure, so that the scheduler's state_dict can hold it."""

    def __init__(self, start: int, end: int, factor: float):
        self.start, self.end, self.factor = start, end, factor

    def __call__(self, step: int) -> float:
        return self.factor * max(0.0, (self.end - step) / (self.end - self.start))


@cache
def cooling_early_stopping() -> type:
    """transformers' EarlyStoppingCallback, except that when patience runs out it first cools the learning rate.

    A run stopped on a plateau stops at whatever rate its schedule had reached, often most of the peak when the
    `auto` rule planned many epochs for a small dataset, and held-out loss then jumps between evaluations with
    the last steps' noise. Decaying the rate to 0 over a short final phase (the decay phase of a warmup-stable-
    decay schedule) settles the weights into the minimum the noise hid. The phase starts from the best weights so
    far (adapter and optimizer state rewound to the best checkpoint once the current one is saved), not from the
    worse ones that ran out the patience. The cooled weights are evaluated and checkpointed like any other; the
    best checkpoint is still what is delivered. The cooldown's state is saved in every checkpoint, so a resumed job
    cools the same way.
    """
    from transformers import EarlyStoppingCallback

    class CoolingEarlyStopping(EarlyStoppingCallback):
        def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0,
                     cooldown: float = 0.0):
            super().__init__(early_stopping_patience, early_stopping_threshold)
            self.cooldown = cooldown
            self.cooldown_start: int | None = None  # the step at which patience ran out
            self.cooldown_end: int | None = None  # the step after which training stops
            self.cooldown_factors: list[float] = []  # the schedule's factor at cooldown_start, per parameter group
            self.rewind_pending = False  # the best checkpoint's weights are still to be loaded
            self.rewound_to: int | None = None  # the step of the weights the cooldown started from

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.cooldown_start is not None and lr_scheduler is not None:  # resumed in the cooldown
                self._install(lr_scheduler)

        def on_evaluate(self, args, state, control, metrics, lr_scheduler=None, **kwargs):
            if self.cooldown_start is not None:  # cooling: the cooldown's end decides when to stop
                return
            # Already stopping: a cancel, a pause, a shutdown or a lost lease, whose evaluation must not be taken for
            # early stopping (and so be resumed past, or cooled).
            stopping = control.should_training_stop
            super().on_evaluate(args, state, control, metrics, **kwargs)
            ran_out = self.early_stopping_patience_counter >= self.early_stopping_patience
            if stopping or not ran_out or self.cooldown <= 0 or lr_scheduler is None:
                return
            end = min(state.max_steps, state.global_step + math.ceil(self.cooldown * state.global_step))
            if end <= state.global_step:
                return
            control.should_training_stop = False
            self.cooldown_start, self.cooldown_end = state.global_step, end
            self.cooldown_factors = [float(f(state.global_step)) for f in lr_scheduler.lr_lambdas]
            self._install(lr_scheduler)
            if self._worse_than_best(args, state, metrics) and state.best_global_step:
                # cool from the best weights so far, once this step's checkpoint (these weights) is saved
                self.rewind_pending, self.rewound_to = True, state.best_global_step

        def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            if not self.rewind_pending:
                return
            self.rewind_pending = False
            # By step, not by the folder's path: a job resumed on another worker has the best checkpoint fetched into
            # its own output folder (`adopt_best_checkpoint`).
            folder = Path(args.output_dir) / f"checkpoint-{self.rewound_to}"
            if folder.is_dir():
                rewind(folder, model, optimizer, lr_scheduler)
            else:  # resumed where the best checkpoint could not be fetched: cool the weights at hand
                self.rewound_to = None

        @staticmethod
        def _worse_than_best(args, state, metrics: dict) -> bool:
            value = metrics.get(args.metric_for_best_model)
            if value is None or state.best_metric is None:
                return False
            return value < state.best_metric if args.greater_is_better else value > state.best_metric

        def on_step_end(self, args, state, control, **kwargs):
            if self.cooldown_end is not None and state.global_step >= self.cooldown_end:
                control.should_training_stop = True
                if args.save_strategy != "epoch":  # at an epoch's end the Trainer evaluates and saves anyway
                    control.should_evaluate = control.should_save = True

        def _install(self, lr_scheduler) -> None:
            lr_scheduler.lr_lambdas = [CooldownSchedule(self.cooldown_start, self.cooldown_end, factor)
                                       for factor in self.cooldown_factors]

        def state(self) -> dict:
            exported = super().state()
            exported["args"]["cooldown"] = self.cooldown
            exported["attributes"] |= {"cooldown_start": self.cooldown_start, "cooldown_end": self.cooldown_end,
                                       "cooldown_factors": self.cooldown_factors,
                                       "rewind_pending": self.rewind_pending, "rewound_to": self.rewound_to}
            return exported

    return CoolingEarlyStopping


def rewind(folder: Path, model, optimizer, lr_scheduler=None) -> None:
    """Load a checkpoint's adapter weights and optimizer state into the training model and its optimizer; the
    learning rate stays the scheduler's (the optimizer's state carries the rate of the checkpoint's step)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        if lr_scheduler is not None:
            for group, rate in zip(optimizer.param_groups, lr_scheduler.get_last_lr(), strict=True):
                group["lr"] = rate


def best_step_to_fetch(resume_from: Path) -> int | None:
    """The step of the best checkpoint a checkpoint's training state names, when it is another checkpoint: a job
    resumed from it needs that one too (it is delivered at the end, and a cooldown may start from its weights)."""
    state = json.loads((resume_from / "trainer_state.json").read_text())
    best = state.get("best_global_step")
    return best if best and best != state.get("global_step") else None


def adopt_best_checkpoint(resume_from: Path, best: Path, checkpoints_dir: Path) -> None:
    """Move the best checkpoint fetched for a resume where the Trainer keeps its checkpoints, and point the resumed
    state at it: the Trainer forgets a best checkpoint whose folder it cannot find, and then delivers the last."""
    path = resume_from / "trainer_state.json"
    state = json.loads(path.read_text())
    target = checkpoints_dir / f"checkpoint-{state['best_global_step']}"
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(best, target)
    path.write_text(json.dumps({**state, "best_model_checkpoint": str(target)}, indent=2, sort_keys=True) + "\n")


def cooldown_of(trainer) -> dict | None:
    """How the trainer's early stopping cooled the learning rate, if it did: the steps it began and ended at, and
    the step whose weights it cooled from (the best so far, or the weights of the step it began at)."""
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "cooldown_start", None) is not None:
            return {"start": callback.cooldown_start, "end": callback.cooldown_end,
                    "from_step": callback.rewound_to or callback.cooldown_start}
    return None


@cache
def checkpoint_evaluating_trainer() -> type:
    """A Trainer whose evaluation is the hooks callback's (no second pass when it already evaluated this step)."""
    from transformers import Trainer

    class CheckpointEvaluatingTrainer(Trainer):
        def __init__(self, *args, hooks_callback, **kwargs):
            super().__init__(*args, **kwargs)
            self.hooks_callback = hooks_callback

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            callback = self.hooks_callback
            last = callback.last_metrics
            if last.get("step") != self.state.global_step or "valid_loss" not in last:
                callback._evaluate(self.state, self.model)
                last = callback.last_metrics
            metrics = {f"{metric_key_prefix}_loss": last["valid_loss"],
                       f"{metric_key_prefix}_mean_token_accuracy": last["valid_mean_token_accuracy"]}
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return CheckpointEvaluatingTrainer


def report_selection(state, spec, hooks: TrainingHooks, cooled: dict | None = None) -> dict | None:
    """Which checkpoint the adapter is, once training succeeded, said in an event: the best evaluated one, or None
    (the last weights) when no checkpoint was evaluated or the best one is not on this worker (chosen before a
    resume and not fetched with it). `cooled`: early stopping's cooldown, if there was one (`cooldown_of`)."""
    if state.best_global_step is None:
        return None
    metric = spec.best_checkpoint_metric
    if state.best_model_checkpoint is None:
        hooks.event("warn", f"The best checkpoint by {metric} (step {state.best_global_step}) was chosen before the job "
                    f"resumed and is not on this worker: the adapter is the last step's ({state.global_step}).")
        return None
    early = cooled is not None or state.global_step < state.max_steps
    selected = {"step": state.best_global_step, "metric": metric, "value": state.best_metric,
                "last_step": state.global_step, "early_stopped": early,
                "cooled_from": cooled["from_step"] if cooled else None}
    stopped = ""
    if early:
        trigger = cooled["start"] if cooled else state.global_step
        stopped = (f"Early stopping at step {trigger} of {state.max_steps}: {metric} did not improve by more than "
                   f"{spec.early_stopping_threshold:g} for {spec.early_stopping_patience} evaluations. ")
        if cooled:
            weights = ("" if cooled["from_step"] == cooled["start"]
                       else f", from the weights of step {cooled['from_step']} (the best before it)")
            stopped += (f"The learning rate then cooled to 0 over steps {cooled['start']}-{cooled['end']}"
                        f"{weights}. ")
    hooks.event("info", f"{stopped}The adapter is the checkpoint of step {state.best_global_step}, the best by {metric} "
                f"({state.best_metric:.4g}); the last step was {state.global_step}.")
    return selected
