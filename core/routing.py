"""Routing by GPU class: the plan of a job, the queue it goes to, and what an out-of-memory error does next.

docs/planning.md states the rules. Torch-free: the API routes every job with it, the worker recovers from OOM with it.
"""

import logging
from dataclasses import dataclass
from typing import Literal

from core.catalogue import model_config, resolve_model
from core.errors import InvalidRequest, ModelNotFound
from core.planning import GpuClass, Plan, default_gpu_classes, make_plan, parse_gpu_classes
from core.queue import GPU_QUEUE
from core.settings import Settings
from core.spec import JobSpec

log = logging.getLogger("lorajobs.routing")

MAX_OOM_HALVINGS = 2  # per class: then the job moves to the next larger class, or fails


class DoesNotFit(InvalidRequest):
    """No configured class holds the job's predicted peak; the error carries the plan and what would make it fit."""

    code = "does_not_fit"
    retryable = False

    def __init__(self, plan: Plan):
        largest = max(plan.classes, key=lambda c: c.memory_gib)
        peak = f"{largest.memory.peak / 1024**3:.1f} GiB" if largest.memory else "more than it has"
        advice = " Would fit: " + "; ".join(plan.advice) + "." if plan.advice else ""
        super().__init__(f"The job fits no configured GPU class: on {largest.name} ({largest.memory_gib:g} GiB) it "
                         f"needs {peak} even at micro-batch {largest.micro_batch_size}.{advice}", param="model")
        self.extra = {"plan": plan.model_dump(mode="json")}


def configured_classes(settings: Settings) -> list[GpuClass]:
    """The classes jobs are routed to (LORAJOBS_GPU_CLASSES), smallest GPU first, the CPU last; empty: no routing."""
    classes = parse_gpu_classes(settings.gpu_classes) if settings.gpu_classes else []
    return sorted(classes, key=lambda c: (c.device != "cuda", c.memory_gib))


def queue_of(gpu: GpuClass) -> str:
    """A GPU class's Celery queue is its name; the CPU class trains on the `gpu` queue, as the embedded default does."""
    return GPU_QUEUE if gpu.device == "cpu" else gpu.name


def plan_job(settings: Settings, spec: JobSpec, *, token_stats: dict | None,
             n_examples: int | None, config: dict | None = None, text_data: bool = False) -> Plan:
    """The job's plan for the configured classes (without any: the default GPU classes and this CPU, for information).

    `config` is the model's config.json when the caller has read it already; otherwise it is read here.
    """
    if config is None:
        try:
            config = model_config(resolve_model(settings.models_dir, spec.model))
        except ModelNotFound as exc:
            raise InvalidRequest(exc.message, param="model", code="model_not_found") from None
    classes = configured_classes(settings) or default_gpu_classes()
    try:
        return make_plan(config, spec, token_stats=token_stats, n_examples=n_examples, gpu_classes=classes,
                         text_data=text_data)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # a config.json the planner misreads
        log.warning("planning failed; the job is planned as an unknown model", exc_info=True)
        plan = make_plan({}, spec, token_stats=token_stats, n_examples=n_examples, gpu_classes=classes,
                         text_data=text_data)
        plan.model_type = config.get("model_type") or ""
        plan.notes.append(f"The planner could not read this model's config.json ({type(exc).__name__}: {exc}).")
        return plan


def place(settings: Settings, spec: JobSpec, plan: Plan) -> dict:
    """Where the job trains: its queue, class and, from the plan, micro-batch and checkpointing.

    Raises DoesNotFit when classes are configured, the counts are known and none fits. An unknown architecture
    is never refused: it goes to the largest class.
    """
    classes = configured_classes(settings)
    if not classes:
        return {"queue": GPU_QUEUE, "class": None, "oom_halvings": 0}
    name = plan.smallest_fitting_class
    if name is None:
        if plan.trainable_parameters is not None:
            raise DoesNotFit(plan)
        name = max(classes, key=lambda c: c.memory_gib).name
    gpu = next(c for c in classes if c.name == name)
    return {"queue": queue_of(gpu), "class": gpu.name, "oom_halvings": 0, **_class_settings(spec, plan, gpu.name)}


def _class_settings(spec: JobSpec, plan: Plan, class_name: str) -> dict:
    """The plan's micro-batch and checkpointing for a class; a micro-batch the spec names is kept as given."""
    entry = next((c for c in plan.classes if c.name == class_name), None)
    if entry is None or entry.micro_batch_size is None:
        return {}
    found = {"gradient_checkpointing": entry.gradient_checkpointing}
    if spec.micro_batch_size is None:
        found |= {"micro_batch_size": entry.micro_batch_size,
                  "gradient_accumulation_steps": entry.gradient_accumulation_steps}
    return found


def planned_seconds(plan: dict | None, placement: dict | None) -> float | None:
    """The planned training time on the job's class; unrouted jobs are taken to run on the CPU (the embedded default)."""
    name = (placement or {}).get("class") or "cpu"
    for entry in (plan or {}).get("classes") or []:
        if entry.get("name") == name:
            return entry.get("duration_seconds")
    return None


def class_for_memory(classes: list[GpuClass], memory_gib: float) -> GpuClass | None:
    """The GPU class a card serves: the largest whose memory the card has (a 24 GB card reports about 23.6 GiB)."""
    held = [c for c in classes if c.device == "cuda" and c.memory_gib <= memory_gib]
    return max(held, key=lambda c: c.memory_gib) if held else None


def predicted_peak(plan: dict | None, placement: dict | None, device: str,
                   peak_device_gib: float | None = None) -> tuple[str, int] | None:
    """(class, predicted peak bytes) for where the job ran: its class, else the CPU class on a CPU or the class the
    card serves on a GPU."""
    entries = [c for c in (plan or {}).get("classes") or [] if c.get("memory")]
    name = (placement or {}).get("class")
    if not any(c["name"] == name and c["device"] == device for c in entries):  # e.g. a CPU worker on a GPU queue
        name = None
    if name is None and device == "cpu":
        name = next((c["name"] for c in entries if c["device"] == "cpu"), None)
    elif name is None and peak_device_gib is not None:
        held = [c for c in entries if c["device"] == "cuda" and c["memory_gib"] <= peak_device_gib]
        name = max(held, key=lambda c: c["memory_gib"])["name"] if held else None
    entry = next((c for c in entries if c["name"] == name), None)
    return (entry["name"], int(entry["memory"]["peak"])) if entry else None


@dataclass(frozen=True)
class OomStep:
    """What a job does after a CUDA out-of-memory error."""

    action: Literal["recompute", "halve", "move", "fail"]
    micro_batch_size: int
    gradient_accumulation_steps: int
    class_name: str | None
    message: str
    gradient_checkpointing: bool | None = None  # the setting to train with from now on; None: unchanged


def _divisor_at_most(batch: int, cap: int) -> int:
    return max(d for d in range(1, max(1, cap) + 1) if batch % d == 0)


def after_oom(*, micro_batch_size: int, gradient_accumulation_steps: int, halvings: int, class_name: str | None,
              classes: list[GpuClass], plan: dict | None = None, gradient_checkpointing: bool | None = None,
              spec_checkpointing: bool | None = None) -> OomStep:
    """Recompute activations if the plan had them kept (and the spec left it to the plan), then halve the
    micro-batch (accumulation doubled: the same batch) at most twice, then move to the next larger configured GPU
    class (with its planned micro-batch and checkpointing), else fail."""
    batch = micro_batch_size * gradient_accumulation_steps
    if gradient_checkpointing is False and spec_checkpointing is None:
        return OomStep("recompute", micro_batch_size, gradient_accumulation_steps, class_name,
                       f"Out of GPU memory at micro-batch {micro_batch_size} with activations kept: retrying from the "
                       "last checkpoint with gradient checkpointing (activations recomputed in the backward pass)",
                       gradient_checkpointing=True)
    if halvings < MAX_OOM_HALVINGS and micro_batch_size > 1:
        micro = _divisor_at_most(batch, micro_batch_size // 2)
        return OomStep("halve", micro, batch // micro, class_name,
                       f"Out of GPU memory at micro-batch {micro_batch_size}: retrying from the last checkpoint with "
                       f"micro-batch {micro} and {batch // micro} accumulation steps (the same batch of {batch})")
    gpus = [c for c in classes if c.device == "cuda"]
    current = next((c for c in gpus if c.name == class_name), None)
    larger = [c for c in gpus if current is not None and c.memory_gib > current.memory_gib]
    if larger:
        target = min(larger, key=lambda c: c.memory_gib)
        entry = next((c for c in (plan or {}).get("classes") or [] if c.get("name") == target.name), {})
        micro = _divisor_at_most(batch, entry.get("micro_batch_size") or micro_batch_size * 2 ** halvings)
        planned = entry.get("gradient_checkpointing") if spec_checkpointing is None else None
        return OomStep("move", micro, batch // micro, target.name,
                       f"Out of GPU memory on {class_name} even at micro-batch {micro_batch_size}: moving to "
                       f"{target.name} ({target.memory_gib:g} GiB) with micro-batch {micro}",
                       gradient_checkpointing=planned)
    where = f" on {class_name}" if class_name else ""
    return OomStep("fail", micro_batch_size, gradient_accumulation_steps, class_name,
                   f"Out of GPU memory{where} at micro-batch {micro_batch_size}"
                   f"{f' after {halvings} halvings' if halvings else ''} and no larger class is configured")
