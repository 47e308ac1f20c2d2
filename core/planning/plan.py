"""The pre-flight plan of a job: parameters, peak memory per GPU class, micro-batch, tokens, steps and duration.

`make_plan` reads only the model's `config.json`, the job spec and the training file's token statistics; it loads
no weights and imports no torch, so the API can call it on every job. docs/planning.md explains the model.
"""

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from core.architectures import holds_4bit
from core.general import GENERATION_BATCH, REPLAY_MAX_NEW_TOKENS
from core.planning.compute import (
    GENERATION_SHARE, QUANTIZED_SPEED, GpuClass, default_gpu_classes, flops_per_token, forward_flops_per_token,
)
from core.planning.memory import GIB, MemoryBreakdown, TrainingSetup, estimate_memory, worker_optimizer
from core.planning.params import AdapterCounts, ModelShape, UnsupportedModel, adapter_counts, model_shape
from core.spec import ResolvedHyperparameters, JobSpec, model_width, resolve_auto

PLAN_OBJECT = "fine_tuning.job.plan"
# Without a training file, an `auto` batch size resolves as for this many examples: the default micro-batch of 8.
EXAMPLES_WHEN_UNKNOWN = 800
SHORTEST_ADVISED_SEQUENCE = 256
SMALLEST_ADVISED_RANK = 4
TIGHT_HEADROOM = 0.05  # below this share of a class's memory left free, the plan says the fit is tight
# Quantization `auto` keeps the 16-bit base only where it leaves this much free: the estimate aims at ±15 %.
AUTO_HEADROOM = 0.15


class ClassPlan(BaseModel):
    """How a job would run on one GPU class: whether it fits, with which micro-batch, and how long it takes."""

    name: str
    device: str
    memory_gib: float = Field(description="The class's memory")
    fits: bool | None = Field(description="Predicted peak within the class's memory; null when the model is unknown")
    micro_batch_size: int | None = Field(None, description="Examples per forward pass chosen to fit (or the smallest tried)")
    gradient_accumulation_steps: int | None = Field(None, description="batch_size / micro_batch_size")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations in the backward pass")
    optimizer: str | None = Field(None, description="The Trainer's optimizer on this device")
    tokens_per_micro_batch: int | None = Field(None, description="Tokens of the largest micro-batch, planned for")
    memory: MemoryBreakdown | None = Field(None, description="Predicted peak memory by part, bytes")
    utilisation: float | None = Field(None, description="Model FLOPs utilisation assumed for the duration")
    tokens_per_second: float | None = None
    duration_seconds: float | None = Field(None, description="Estimated run time: training, and general replay's "
                                                              "answering before it; null without a token count")
    replay_seconds: float | None = Field(None, description="Of the duration, the base answering general replay's "
                                                           "prompts before training")


class Plan(BaseModel):
    """A job's pre-flight plan (`fine_tuning.job.plan`)."""

    object: Literal["fine_tuning.job.plan"] = PLAN_OBJECT
    model: str
    model_type: str
    trainable_parameters: int | None = Field(description="Adapter parameters, as PEFT's get_nb_trainable_parameters")
    total_parameters: int | None = Field(description="Language model plus adapter, tied weights once, as PEFT counts")
    trainable_percent: float | None
    vision_parameters: int | None = Field(None, description="Multimodal: the vision tower's estimated size, not counted")
    adapted_modules: list[str] = Field(default_factory=list, description="Layer names the adapter targets")
    adapted_layers: int | None = Field(None, description="Linear layers with an adapter, in the whole model")
    quantization: str
    max_seq_length: int
    tokens_per_example: float | None = Field(None, description="Mean tokens of an example after truncation")
    longest_example: int = Field(description="Tokens of the longest example after truncation: memory plans for it")
    n_examples: int | None = Field(None, description="Training examples")
    replayed_examples: int = Field(0, description="General replay's answers planned beside them, at most (answers "
                                                  "the base does not finish within 128 tokens are left out)")
    n_epochs: int
    batch_size: int
    training_tokens: int | None = Field(None, description="Tokens processed over all epochs")
    steps: int | None = Field(None, description="Optimizer steps over all epochs")
    classes: list[ClassPlan]
    smallest_fitting_class: str | None = Field(description="First class that fits: GPUs by memory, then the CPU")
    advice: list[str] = Field(default_factory=list, description="When nothing fits: what would")
    notes: list[str] = Field(default_factory=list, description="Choices made and the limits of the estimate")


@dataclass(frozen=True)
class Lengths:
    """Token lengths of the training examples after truncation."""

    longest: int
    mean: float | None
    padded: float | None  # an unpacked micro-batch is padded to its longest example: about the 95th percentile


def example_lengths(spec: JobSpec, token_stats: dict | None) -> Lengths:
    """Lengths from the file's token statistics for this model; without them every example is max_seq_length long."""
    limit = spec.max_seq_length
    if not token_stats or not token_stats.get("count"):
        return Lengths(limit, None, None)
    return Lengths(min(limit, int(token_stats["max"])), min(limit, float(token_stats["mean"])),
                   min(limit, float(token_stats.get("p95") or token_stats["max"])))


# A replayed general answer's row: prompt, chat template and an answer of at most 128 new tokens
# (worker/training/replay.py). SmolLM2-135M's averaged 85 tokens with its default system prompt.
REPLAY_ROW_TOKENS = 96

# Tokenizers of the families the catalogue holds count the same English text within about a fifth of each other
# (Llama 2's 32k vocabulary against Llama 3's 128k); a file counted with another model's tokenizer is planned a
# quarter longer than that count.
BORROWED_TOKENS_MARGIN = 1.25


def borrowed_token_stats(by_model: dict[str, dict]) -> dict | None:
    """Token statistics for a model the file was not counted with (added to the catalogue after the file was
    validated): the longest of the counts the file has, a quarter longer. None when it has none."""
    counted = [stats for stats in by_model.values() if stats and stats.get("count")]
    if not counted:
        return None
    longest = max(counted, key=lambda stats: (stats["mean"], stats["max"]))
    return {**longest, **{key: math.ceil(longest[key] * BORROWED_TOKENS_MARGIN) for key in ("max", "p95", "total")},
            "mean": longest["mean"] * BORROWED_TOKENS_MARGIN}


def _micro_batch_candidates(hp: ResolvedHyperparameters) -> list[int]:
    """Divisors of the batch size up to the resolved micro-batch, largest first: accumulation keeps the batch."""
    return [m for m in range(hp.micro_batch_size, 0, -1) if hp.batch_size % m == 0]


def _setup(spec: JobSpec, gpu: GpuClass, micro: int, checkpointing: bool, lengths: Lengths) -> TrainingSetup:
    tokens = micro * lengths.longest
    return TrainingSetup(
        device=gpu.device, quantization=spec.quantization, double_quant=spec.double_quant,
        optimizer=worker_optimizer(spec.quantization, gpu.device), gradient_checkpointing=checkpointing,
        tokens=tokens, sequence=tokens if spec.packing else lengths.longest, masked=micro > 1,
        lora_dropout=spec.lora.dropout, compute_dtype_bytes=4 if spec.compute_dtype == "float32" else 2,
    )


def _duration(shape: ModelShape, adapter: AdapterCounts, spec: JobSpec, gpu: GpuClass, micro: int,
              checkpointing: bool, lengths: Lengths, training_tokens: int | None) -> tuple[float | None, float | None]:
    """(tokens per second, seconds) for the training tokens, from the FLOPs model at the class's utilisation."""
    if training_tokens is None or lengths.mean is None:
        return None, None
    if spec.packing and not shape.vision_parameters:  # attention per packed example (worker/training/attention.py)
        sequence, masked, computed_per_token = lengths.mean, False, 1.0
    elif spec.packing:  # a multimodal model keeps transformers' dense mask over the packed row
        sequence, masked, computed_per_token = micro * lengths.mean, micro > 1, 1.0
    else:
        sequence, masked, computed_per_token = lengths.padded, micro > 1, lengths.padded / lengths.mean  # padding too
    flops, _ = flops_per_token(shape, adapter, sequence=sequence, masked=masked, gradient_checkpointing=checkpointing)
    speed = gpu.tflops * 1e12 * gpu.utilisation * (QUANTIZED_SPEED[gpu.device] if spec.quantization != "none" else 1)
    tokens_per_second = speed / (flops * computed_per_token)
    return tokens_per_second, training_tokens / tokens_per_second


def _replay_seconds(shape: ModelShape, spec: JobSpec, gpu: GpuClass, memory: MemoryBreakdown, replayed: int) -> float:
    """The base's greedy answers to `replayed` prompts before training (worker/training/replay.py): batches of
    GENERATION_BATCH rows, each REPLAY_MAX_NEW_TOKENS steps at most (a batch runs until its last row finishes). A step
    computes a token a row, at GENERATION_SHARE of training's utilisation, and on a GPU reads every weight once."""
    if not replayed:
        return 0.0
    rows = min(replayed, GENERATION_BATCH)
    # a 4-bit job generates on its 4-bit base on a GPU, on the full-precision base on the CPU (no 4-bit inference there)
    quantized = spec.quantization != "none" and gpu.device == "cuda"
    speed = gpu.tflops * 1e12 * gpu.utilisation * GENERATION_SHARE * (QUANTIZED_SPEED["cuda"] if quantized else 1)
    step = rows * forward_flops_per_token(shape) / speed
    if gpu.memory_bandwidth_gbs:
        step = max(step, (memory.quantized_weights + memory.full_precision_weights) / (gpu.memory_bandwidth_gbs * 1e9))
    return math.ceil(replayed / GENERATION_BATCH) * REPLAY_MAX_NEW_TOKENS * step


def _plan_class(shape: ModelShape, adapter: AdapterCounts, spec: JobSpec, hp: ResolvedHyperparameters,
                gpu: GpuClass, lengths: Lengths, training_tokens: int | None, replayed: int = 0) -> ClassPlan:
    """The largest micro-batch that fits, without gradient checkpointing if any does (it costs a third forward)."""
    candidates = _micro_batch_candidates(hp)
    # 4-bit or not, recomputing activations only pays where memory needs it; a spec may fix the choice.
    modes = [spec.gradient_checkpointing] if spec.gradient_checkpointing is not None else [False, True]
    options = [(micro, checkpointing) for checkpointing in modes for micro in candidates]
    capacity = gpu.memory_gib * GIB
    for micro, checkpointing in options:
        setup = _setup(spec, gpu, micro, checkpointing, lengths)
        memory = estimate_memory(shape, adapter, setup)
        if memory.peak <= capacity:
            break
    fits = memory.peak <= capacity
    tokens_per_second, seconds = _duration(shape, adapter, spec, gpu, micro, checkpointing, lengths, training_tokens)
    replay_seconds = None
    if seconds is not None:
        replay_seconds = _replay_seconds(shape, spec, gpu, memory, replayed)
        seconds += replay_seconds
    return ClassPlan(
        name=gpu.name, device=gpu.device, memory_gib=gpu.memory_gib, fits=fits, micro_batch_size=micro,
        gradient_accumulation_steps=hp.batch_size // micro, gradient_checkpointing=checkpointing,
        optimizer=setup.optimizer, tokens_per_micro_batch=setup.tokens, memory=memory,
        utilisation=gpu.utilisation, tokens_per_second=tokens_per_second, duration_seconds=seconds,
        replay_seconds=replay_seconds,
    )


def _routing_order(classes: list[ClassPlan]) -> list[ClassPlan]:
    return sorted(classes, key=lambda c: (c.device != "cuda", c.memory_gib))


def _smallest_fitting(classes: list[ClassPlan]) -> ClassPlan | None:
    return next((c for c in _routing_order(classes) if c.fits), None)


def _hyperparameters(spec: JobSpec, n_examples: int | None, config: dict) -> ResolvedHyperparameters:
    return resolve_auto(spec, n_examples if n_examples is not None else EXAMPLES_WHEN_UNKNOWN, model_width(config))


def _classes_for(config: dict, spec: JobSpec, shape: ModelShape, hp: ResolvedHyperparameters, lengths: Lengths,
                 gpu_classes: list[GpuClass], training_tokens: int | None) -> list[ClassPlan]:
    adapter = adapter_counts(shape, config, spec.lora)
    return [_plan_class(shape, adapter, spec, hp, gpu, lengths, training_tokens) for gpu in gpu_classes]


def _variants(spec: JobSpec, shape: ModelShape, lengths: Lengths) -> list[tuple[str, JobSpec]]:
    """Changes that lower memory, cheapest to the result first: 4-bit base, smaller rank, shorter sequences."""
    variants = []
    quantized = spec if spec.quantization != "none" else spec.model_copy(update={"quantization": "nf4"})
    if quantized is not spec:
        variants.append(("quantization='nf4' (QLoRA)", quantized))
    elif shape.experts:
        variants.append(("quantization='none' (the experts stay bf16)", spec.model_copy(update={"quantization": "none"})))
    rank = spec.lora.r // 2
    while rank >= SMALLEST_ADVISED_RANK:
        variants.append((f"lora.r={rank}", spec.model_copy(update={"lora": spec.lora.model_copy(update={"r": rank})})))
        rank //= 2
    length = lengths.longest // 2
    while length >= SHORTEST_ADVISED_SEQUENCE:
        for label, base in [("", spec)] + ([("quantization='nf4' and ", quantized)] if quantized is not spec else []):
            variants.append((f"{label}max_seq_length={length}", base.model_copy(update={"max_seq_length": length})))
        length //= 2
    return variants


def _advice(config: dict, spec: JobSpec, shape: ModelShape, hp: ResolvedHyperparameters, lengths: Lengths,
            gpu_classes: list[GpuClass]) -> list[str]:
    """What would make a job that fits nowhere fit somewhere: each change tried alone, the first few that work."""
    advice = []
    for label, variant in _variants(spec, shape, lengths):
        variant_lengths = Lengths(min(lengths.longest, variant.max_seq_length), None, None)
        classes = _classes_for(config, variant, shape, hp, variant_lengths, gpu_classes, None)
        best = _smallest_fitting(classes)
        if best is not None:
            advice.append(f"{label}: fits {best.name} with micro-batch {best.micro_batch_size} "
                          f"(predicted {best.memory.peak / GIB:.1f} of {best.memory_gib:g} GiB)")
        if len(advice) == 3:
            break
    largest = max(gpu_classes, key=lambda g: g.memory_gib)
    if not advice:
        weights = estimate_memory(shape, adapter_counts(shape, config, spec.lora),
                                  _setup(spec, largest, 1, True, lengths))
        base = (weights.quantized_weights + weights.full_precision_weights) / GIB
        advice.append(f"Nothing tried fits {largest.name} ({largest.memory_gib:g} GiB): the base weights alone take "
                      f"{base:.1f} GiB; this model needs a larger GPU or several (not supported yet).")
    return advice


def _notes(shape: ModelShape, spec: JobSpec, hp: ResolvedHyperparameters, lengths: Lengths,
           classes: list[ClassPlan]) -> list[str]:
    notes = list(shape.notes)
    if lengths.mean is None:
        notes.append("No token statistics for this model: memory assumes every example fills max_seq_length, "
                     "and there is no duration.")
    for plan in classes:
        if not plan.fits:
            continue
        if plan.micro_batch_size < hp.micro_batch_size:
            notes.append(f"{plan.name}: micro-batch {plan.micro_batch_size} instead of {hp.micro_batch_size}; "
                         f"{plan.gradient_accumulation_steps} accumulation steps keep the batch of {hp.batch_size}.")
        if plan.gradient_checkpointing and spec.gradient_checkpointing is None:
            notes.append(f"{plan.name}: fits only with gradient checkpointing.")
        headroom = plan.memory_gib - plan.memory.peak / GIB
        if headroom < TIGHT_HEADROOM * plan.memory_gib:
            notes.append(f"{plan.name}: a tight fit, {headroom:.1f} GiB left of {plan.memory_gib:g}; the estimate "
                         "aims at ±15 %.")
    if shape.experts and spec.quantization != "none":
        notes.append("QLoRA holds the MoE experts in fp32 (twice bf16): quantization='none' needs less memory.")
    if spec.quantization != "none" and any(c.optimizer == "paged_adamw_8bit" for c in classes):
        notes.append("Paged 8-bit AdamW: under memory pressure its states move to CPU RAM instead of failing.")
    return notes


def make_plan(config: dict, spec: JobSpec, *, token_stats: dict | None = None, n_examples: int | None = None,
              gpu_classes: list[GpuClass] | None = None, text_data: bool = False) -> Plan:
    """The plan of `spec` on the model of `config` (a `config.json` dict) for each GPU class.

    `token_stats` is the training file's report entry for this model (`report["token_stats"][model]`);
    `n_examples` the examples trained on (after the validation split), by default the statistics' count.
    Quantization `auto` is resolved here: the plan's `quantization` is the one chosen, and a note says why.
    General replay's answers count in the steps and tokens, except for `text_data` (which is never replayed).
    """
    gpu_classes = gpu_classes if gpu_classes is not None else default_gpu_classes()
    if spec.quantization != "auto":
        return _make_plan(config, spec, token_stats, n_examples, gpu_classes, text_data)
    return _resolve_quantization(config, spec, token_stats, n_examples, gpu_classes, text_data)


def _resolve_quantization(config: dict, spec: JobSpec, token_stats: dict | None, n_examples: int | None,
                          gpu_classes: list[GpuClass], text_data: bool) -> Plan:
    """`auto`: LoRA on the 16-bit base wherever that fits a class, 4-bit NF4 (QLoRA) only where it fits nowhere.

    The adapter is served on the full-precision base; trained over a 4-bit base it also learns that base's rounding,
    which costs held-out quality where it is served (docs/job-spec.md). On a GPU the 16-bit base is faster too.
    """
    plain = _make_plan(config, spec.model_copy(update={"quantization": "none"}), token_stats, n_examples, gpu_classes,
                       text_data)
    roomy = next((c for c in _routing_order(plain.classes)
                  if c.fits and c.memory.peak <= (1 - AUTO_HEADROOM) * c.memory_gib * GIB), None)
    if roomy is not None:
        plain.notes.insert(0, f"quantization 'auto' chose 'none' (LoRA on the 16-bit base): it fits {roomy.name} "
                              f"(predicted {roomy.memory.peak / GIB:.1f} of {roomy.memory_gib:g} GiB); 4-bit only "
                              "where it would fit no class with room to spare.")
        return plain
    if not holds_4bit(config):
        plain.notes.insert(0, "quantization 'auto' chose 'none': this architecture cannot be held in 4 bits.")
        return plain
    quantized = _make_plan(config, spec.model_copy(update={"quantization": "nf4"}), token_stats, n_examples,
                           gpu_classes, text_data)
    why = "the model's memory is unknown" if all(c.fits is None for c in plain.classes) else \
        f"the 16-bit base fits no configured class with {AUTO_HEADROOM * 100:g} % of its memory to spare"
    quantized.notes.insert(0, f"quantization 'auto' chose 'nf4' (QLoRA): {why}.")
    return quantized


def _make_plan(config: dict, spec: JobSpec, token_stats: dict | None, n_examples: int | None,
               gpu_classes: list[GpuClass], text_data: bool) -> Plan:
    lengths = example_lengths(spec, token_stats)
    if n_examples is None and token_stats and token_stats.get("count"):
        n_examples = int(token_stats["count"])
    hp = _hyperparameters(spec, n_examples, config)
    training_tokens = steps = None
    replayed = 0 if text_data or n_examples is None else hp.general_replay
    if n_examples is not None:
        steps = hp.n_epochs * math.ceil((n_examples + replayed) / hp.batch_size)
        if lengths.mean is not None:
            replay_tokens = replayed * min(spec.max_seq_length, REPLAY_ROW_TOKENS)
            training_tokens = round(hp.n_epochs * (n_examples * lengths.mean + replay_tokens))
    common = dict(model=spec.model, quantization=spec.quantization, max_seq_length=spec.max_seq_length,
                  tokens_per_example=lengths.mean, longest_example=lengths.longest, n_examples=n_examples,
                  replayed_examples=replayed, n_epochs=hp.n_epochs, batch_size=hp.batch_size,
                  training_tokens=training_tokens, steps=steps)
    try:
        shape = model_shape(config)
    except UnsupportedModel as exc:
        model_type = config.get("model_type") or ""
        unknown = [ClassPlan(name=g.name, device=g.device, memory_gib=g.memory_gib, fits=None) for g in gpu_classes]
        return Plan(model_type=model_type, trainable_parameters=None, total_parameters=None, trainable_percent=None,
                    classes=unknown, smallest_fitting_class=None,
                    notes=[f"{exc}: no counts, memory or fit.", *_replay_notes(replayed, n_examples)],
                    **common)
    adapter = adapter_counts(shape, config, spec.lora)
    total = shape.base_parameters + adapter.parameters
    classes = [_plan_class(shape, adapter, spec, hp, gpu, lengths, training_tokens, replayed) for gpu in gpu_classes]
    best = _smallest_fitting(classes)
    return Plan(
        model_type=shape.model_type, trainable_parameters=adapter.parameters, total_parameters=total,
        trainable_percent=round(100 * adapter.parameters / total, 4), vision_parameters=shape.vision_parameters,
        adapted_modules=list(adapter.names), adapted_layers=adapter.modules, classes=classes,
        smallest_fitting_class=best.name if best else None,
        advice=[] if best or not classes else _advice(config, spec, shape, hp, lengths, gpu_classes),
        notes=_notes(shape, spec, hp, lengths, classes) + _replay_notes(replayed, n_examples), **common,
    )


def _replay_notes(replayed: int, n_examples: int | None) -> list[str]:
    if not replayed:
        return []
    return [f"General replay: up to {replayed} answers of the base to built-in general prompts train beside the "
            f"{n_examples} examples every epoch (docs/job-spec.md); the steps and tokens count them, and the "
            f"duration the base's answering them before training (`replay_seconds`)."]
