"""View models: what the dashboard's templates show of a job, a file or a report, shaped once for pages and polls."""

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from db.models import Checkpoint, File, Job, JobEvent

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
STATUS_LABELS = {"validating_files": "Validating files", "queued": "Queued", "running": "Running",
                 "succeeded": "Succeeded", "failed": "Failed", "cancelled": "Cancelled",
                 "uploaded": "Validating", "processed": "Processed", "error": "Error"}
# What a person can change when a job fails with this code; other codes' messages already say it.
FAILURE_ADVICE = {
    "invalid_file": "Fix the problems listed in the file's validation report, upload it again and create a new job.",
    "training_error": "The worker retried and the error persisted: check the event log; if it names a setting "
                      "(length, batch size, target modules), change it in a new job, otherwise tell your operator.",
    "no_trainable_examples": "Raise max_seq_length or shorten the prompts so each example keeps an answer token.",
    "worker_lost": "The worker was lost too many times; a new job usually succeeds once workers are healthy.",
    "out_of_memory": "Lower the micro batch size or max_seq_length, or hold the base in 4 bits (quantization nf4).",
}
DEFAULT_FAILURE_ADVICE = "Change what the message names and create a new job with the same file."


def is_finished(status: str) -> bool:
    return status in TERMINAL_STATUSES


def iso_time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def shown_time(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float | None) -> str:
    """A duration as people read it: `42 s`, `3 min 05 s`, `2 h 07 min`."""
    if seconds is None or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def number(value: Any) -> str:
    """A metric or setting, short: losses to 4 digits, small rates in scientific notation."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


@dataclass
class JobRow:
    id: str
    model: str
    fine_tuned_model: str | None
    status: str
    status_label: str
    finished: bool
    percent: float | None
    step: int | None
    total_steps: int | None
    eta: str | None
    duration: str
    trained_tokens: str
    created: str
    created_iso: str
    cancel_requested: bool


def _progress(job: Job) -> tuple[float | None, int | None, int | None]:
    progress = job.progress or {}
    if job.status == "succeeded":
        return 100.0, progress.get("step"), progress.get("total_steps")
    if not progress:
        return (0.0 if job.status in ("queued", "running") else None), None, None
    return float(progress.get("percent") or 0.0), progress.get("step"), progress.get("total_steps")


def job_row(job: Job, now: float | None = None) -> JobRow:
    now = now or time.time()
    percent, step, total = _progress(job)
    eta = None
    if job.status == "running" and job.estimated_finish:
        eta = "about " + span(max(0.0, job.estimated_finish - now)) + " left"
    end = job.finished_at or (now if job.status == "running" else None)
    duration = span(end - job.started_at) if job.started_at and end else "—"
    return JobRow(id=job.id, model=job.model, fine_tuned_model=job.fine_tuned_model, status=job.status,
                  status_label=STATUS_LABELS.get(job.status, job.status), finished=is_finished(job.status),
                  percent=percent, step=step, total_steps=total, eta=eta, duration=duration,
                  trained_tokens=count(job.trained_tokens), created=shown_time(job.created_at),
                  created_iso=iso_time(job.created_at), cancel_requested=bool(job.cancel_requested))


def row_summary(row: JobRow) -> dict[str, Any]:
    """The few numbers a poll reports of a job: enough for a screen reader's status line and for scripts."""
    return {"id": row.id, "status": row.status, "status_label": row.status_label, "percent": row.percent,
            "step": row.step, "total_steps": row.total_steps, "eta": row.eta, "duration": row.duration,
            "cancel_requested": row.cancel_requested, "finished": row.finished}


def version_of(value: Any) -> str:
    """A short fingerprint of what a panel shows: a poll sends the panel again only when it changes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def panel_version(job: Job, newest_checkpoint: str | None, unserved: str | None) -> str:
    """What the job page's slower panels (evaluation, checkpoints, plan, settings) are drawn from."""
    return version_of([job.status, job.cancel_requested, job.hyperparameters, job.parameters, job.baseline_eval_loss,
                       job.final_eval_loss, job.result, job.placement, job.plan, job.error, newest_checkpoint,
                       unserved])


@dataclass
class Setting:
    name: str
    value: str
    rule: str | None = None


def spec_settings(spec: dict[str, Any]) -> list[Setting]:
    """The resolved spec, flat: the adapter's fields as `lora.r`, `lora.alpha`, ..."""
    rows = []
    for name, value in spec.items():
        if isinstance(value, dict):
            rows += [Setting(f"{name}.{inner}", number(v)) for inner, v in value.items()]
        else:
            rows.append(Setting(name, number(value)))
    return rows


def hyperparameter_settings(resolved: dict[str, Any] | None, spec: dict[str, Any]) -> list[Setting]:
    """The numbers the job trains with; each value that was `auto` carries the rule that chose it."""
    if not resolved:
        return []
    rules = resolved.get("auto_rules") or {}
    rows = []
    for name, value in resolved.items():
        if name == "auto_rules" or value is None:
            continue
        asked = spec.get(name)
        rule = rules.get(name)
        if rule is None and asked == "auto":
            rule = "auto"
        rows.append(Setting(name, number(value), rule))
    return rows


@dataclass
class EventRow:
    id: str
    created: str
    created_iso: str
    level: str
    type: str
    message: str


def event_row(event: JobEvent) -> EventRow:
    return EventRow(event.id, shown_time(event.created_at), iso_time(event.created_at), event.level, event.type,
                    event.message)


@dataclass
class CheckpointRow:
    id: str
    step: int
    created: str
    metrics: list[Setting]
    sha256: str
    download_url: str


CHECKPOINT_METRICS = ("train_loss", "valid_loss", "valid_mean_token_accuracy", "learning_rate", "exact_match", "key_facts")


def checkpoint_row(job_id: str, checkpoint: Checkpoint) -> CheckpointRow:
    metrics = [Setting(name, number(checkpoint.metrics[name])) for name in CHECKPOINT_METRICS
               if checkpoint.metrics.get(name) is not None]
    return CheckpointRow(checkpoint.id, checkpoint.step, shown_time(checkpoint.created_at), metrics,
                         checkpoint.sha256, f"/jobs/{job_id}/adapter?checkpoint={checkpoint.id}")


@dataclass
class Series:
    """Points of the loss chart: (step, value) pairs, one list per curve."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    valid_loss: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)

    def as_json(self) -> dict[str, list]:
        return {"train_loss": self.train_loss, "valid_loss": self.valid_loss, "learning_rate": self.learning_rate}


def metrics_series(events: list[JobEvent]) -> Series:
    """The chart's curves from a job's `metrics` events, in step order, one point per step and curve."""
    curves: dict[str, dict[int, float]] = {"train_loss": {}, "valid_loss": {}, "learning_rate": {}}
    for event in events:
        data = event.data or {}
        if event.type != "metrics" or not isinstance(data.get("step"), (int, float)):
            continue
        for name, points in curves.items():
            if isinstance(data.get(name), (int, float)):
                points[int(data["step"])] = float(data[name])
    return Series(**{name: sorted(points.items()) for name, points in curves.items()})


@dataclass
class FailureView:
    code: str
    message: str
    advice: str


def failure(job: Job) -> FailureView | None:
    if job.status != "failed" or not job.error:
        return None
    code = job.error.get("code") or "error"
    message = job.error.get("message") or "The job failed."
    return FailureView(code, message, FAILURE_ADVICE.get(code, DEFAULT_FAILURE_ADVICE))


@dataclass
class EvalComparison:
    baseline: str
    final: str
    change: str | None
    parameters: str | None = None
    served: list[tuple[str, str]] = field(default_factory=list)  # QLoRA: where the adapter is served, both merges
    merge_base: str | None = None


SERVED_LOSSES = (("adapter_on_full_precision_base", "Eval loss served on the full-precision base"),
                 ("merged_full_precision", "Merged into the full-precision base"),
                 ("merged_dequantized_4bit", "Merged into the dequantized 4-bit base"))


def parameter_summary(parameters: dict | None) -> str | None:
    if not parameters:
        return None
    return (f"{parameters['trainable_parameters']:,} of {parameters['total_parameters']:,} "
            f"({parameters['trainable_percent']:.4f} %)")


def eval_comparison(job: Job) -> EvalComparison | None:
    parameters = parameter_summary(job.parameters)
    if job.baseline_eval_loss is None and job.final_eval_loss is None and parameters is None:
        return None
    change = None
    if job.baseline_eval_loss and job.final_eval_loss is not None:
        change = f"{(job.final_eval_loss - job.baseline_eval_loss) / job.baseline_eval_loss * 100:+.1f} %"
    served = (job.result or {}).get("served_eval") or {}
    merge_base = None
    if served:
        merge_base = "the dequantized 4-bit base" if served["merge_base"] == "dequantized_4bit" else \
            "the full-precision base"
    return EvalComparison(number(job.baseline_eval_loss), number(job.final_eval_loss), change, parameters,
                          [(label, number(served[key]["loss"])) for key, label in SERVED_LOSSES if key in served],
                          merge_base)


@dataclass
class FileRow:
    id: str
    filename: str
    purpose: str
    size: str
    status: str
    status_label: str
    details: str | None
    created: str
    created_iso: str
    examples: int | None


def file_row(row: File) -> FileRow:
    examples = (row.report or {}).get("examples") if row.report else None
    return FileRow(row.id, row.filename, row.purpose, size(row.bytes), row.status,
                   STATUS_LABELS.get(row.status, row.status), row.status_details, shown_time(row.created_at),
                   iso_time(row.created_at), examples)


GIB = 1024**3


@dataclass
class PlanClassRow:
    name: str
    memory_gib: str
    fits: str
    micro: str
    checkpointing: str
    peak: str
    weights: str
    adapter: str
    activations: str
    other: str
    duration: str
    chosen: bool


@dataclass
class PlanView:
    """A job's pre-flight plan as the job page and the new-job form show it."""

    summary: str
    data: str
    classes: list[PlanClassRow]
    smallest: str
    advice: list[str]
    notes: list[str]
    placement: str | None = None
    measured: str | None = None
    warning: str | None = None


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f} GiB"


def plan_view(plan: dict | None, placement: dict | None = None, *, unserved: str | None = None) -> PlanView | None:
    if not plan:
        return None
    placement = placement or {}
    chosen = placement.get("class") or plan.get("smallest_fitting_class")
    if plan.get("trainable_parameters") is not None:
        summary = (f"{plan['trainable_parameters']:,} trainable of {plan['total_parameters']:,} parameters "
                   f"({plan['trainable_percent']} %) on {', '.join(plan.get('adapted_modules') or [])}")
    else:
        summary = f"No counts for model type '{plan.get('model_type') or 'unknown'}'."
    data = (f"quantization {plan['quantization']}, max_seq_length {plan['max_seq_length']}, batch {plan['batch_size']}, "
            f"{plan['n_epochs']} epochs")
    if plan.get("n_examples") is not None:
        data += f" of {plan['n_examples']:,} examples"
        if plan.get("replayed_examples"):
            data += f" and up to {plan['replayed_examples']} replayed general answers"
    if plan.get("training_tokens") is not None:
        data += f", {plan['training_tokens']:,} tokens in {plan['steps']:,} steps"
    rows = []
    for c in plan.get("classes") or []:
        m = c.get("memory") or {}
        rows.append(PlanClassRow(
            name=c["name"], memory_gib=f"{c['memory_gib']:g} GiB", fits=number(c.get("fits")),
            micro=f"{c['micro_batch_size']} × {c['gradient_accumulation_steps']}" if c.get("micro_batch_size") else "—",
            checkpointing=number(c.get("gradient_checkpointing")), peak=_gib(m.get("peak")),
            weights=_gib(m["quantized_weights"] + m["full_precision_weights"]) if m else "—",
            adapter=_gib(m["adapter_weights"] + m["gradients"] + m["optimizer_states"]) if m else "—",
            activations=_gib(m["activations"] + m["logits"]) if m else "—", other=_gib(m.get("overhead")),
            duration=span(c.get("duration_seconds")), chosen=c["name"] == chosen))
    where = None
    if placement.get("queue"):
        where = f"queue {placement['queue']}" + (f", class {placement['class']}" if placement.get("class") else "")
        if placement.get("micro_batch_size"):
            where += (f", micro-batch {placement['micro_batch_size']} × {placement['gradient_accumulation_steps']}"
                      " accumulation")
    measured = None
    if placement.get("measured_peak_bytes"):
        measured = f"{_gib(placement['measured_peak_bytes'])} on {placement['measured_on']}"
        if placement.get("predicted_peak_bytes"):
            measured += f" (predicted {_gib(placement['predicted_peak_bytes'])} for {placement['predicted_class']})"
    return PlanView(summary=summary, data=data, classes=rows, smallest=plan.get("smallest_fitting_class") or "none",
                    advice=list(plan.get("advice") or []), notes=list(plan.get("notes") or []), placement=where,
                    measured=measured, warning=unserved)
