"""Best checkpoint, not last: evaluate every checkpoint, deliver the best, stop when it stops improving.

transformers does the bookkeeping (`load_best_model_at_end`, `metric_for_best_model`, `EarlyStoppingCallback`,
and a `save_total_limit` that never deletes the best); the evaluation it runs at each checkpoint is ours
(token loss and accuracy on trained tokens, worker/training/evaluate.py), reported through the hooks like every
other evaluation, so the checkpoint's metrics carry it.
"""

from functools import cache

from worker.training.hooks import TrainingHooks

# The spec's metric -> (the Trainer's metric name, whether higher is better).
METRICS = {"valid_loss": ("eval_loss", False), "valid_mean_token_accuracy": ("eval_mean_token_accuracy", True)}


def selection_arguments(spec, has_validation: bool) -> dict:
    """TrainingArguments that evaluate at every checkpoint and load the best at the end; none without validation."""
    if not has_validation:
        return {}
    name, higher = METRICS[spec.best_checkpoint_metric]
    return {"eval_strategy": "steps" if spec.save_steps else "epoch", "eval_steps": spec.save_steps,
            "load_best_model_at_end": True, "metric_for_best_model": name, "greater_is_better": higher}


def selection_callbacks(spec, has_validation: bool) -> list:
    if not has_validation or spec.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=spec.early_stopping_patience,
                                  early_stopping_threshold=spec.early_stopping_threshold)]


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


def report_selection(state, spec, hooks: TrainingHooks) -> dict | None:
    """Which checkpoint the adapter is, once training succeeded, said in an event: the best evaluated one, or None
    (the last weights) when no checkpoint was evaluated or the best one is not on this worker (chosen before a
    resume)."""
    if state.best_global_step is None:
        return None
    metric = spec.best_checkpoint_metric
    if state.best_model_checkpoint is None:
        hooks.event("warn", f"The best checkpoint by {metric} (step {state.best_global_step}) was chosen before the job "
                    f"resumed and is not on this worker: the adapter is the last step's ({state.global_step}).")
        return None
    early = state.global_step < state.max_steps
    selected = {"step": state.best_global_step, "metric": metric, "value": state.best_metric,
                "last_step": state.global_step, "early_stopped": early}
    stopped = (f"Early stopping at step {state.global_step} of {state.max_steps}: {metric} did not improve by more "
               f"than {spec.early_stopping_threshold:g} for {spec.early_stopping_patience} evaluations. ") if early else ""
    hooks.event("info", f"{stopped}The adapter is the checkpoint of step {state.best_global_step}, the best by {metric} "
                f"({state.best_metric:.4g}); the last step was {state.global_step}.")
    return selected
