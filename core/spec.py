"""The job spec: the whole training configuration as one pydantic model built from topic sections.

The API validates it (OpenAI-style request bodies pass straight into it), the job row stores it as
JSON, the worker re-reads it. `resolve_auto` turns the `"auto"` values into concrete numbers by the
rule written in docs/job-spec.md. Torch-free.
"""

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.general import GENERAL_QUESTIONS, REPLAY_PROMPTS

TargetPreset = Literal["attention-qv", "attention", "all-linear"]

BASE_LEARNING_RATE = 2e-4  # the QLoRA paper's rate for 7B-13B models, at a batch of 8 and a model 4,096 wide
DEFAULT_MICRO_BATCH_SIZE = 8
# `auto` scales the rate with the model's width: narrower models take larger rates. The exponent is LoRA Without
# Regret's fit for the Llama family (Thinking Machines, 2025: best LoRA rate ∝ width^-0.781), anchored at 2e-4 for
# the 4,096-wide 7B-8B models; it gives 9.3e-4 at SmolLM2-135M's 576, where 1e-3 learnt facts in a third of the
# passes 1e-4 needed (docs/benchmarks.md, "Quality"). Capped at 5x (1e-3 at batch 8, the highest rate measured here).
REFERENCE_WIDTH = 4096
WIDTH_EXPONENT = 0.781
MAX_AUTO_MULTIPLIER = 5.0
MIN_AUTO_MULTIPLIER = 0.5
# Auto batches hold at least this many examples where the data allows (a quarter of the examples at most): a batch of
# one trains a small set no better (measured) and runs each example alone, at a fraction of the hardware's rate.
MIN_AUTO_BATCH_SIZE = 8
# Auto epochs train at least this many examples in total: a small fact set is only learnt after many passes (measured
# in docs/benchmarks.md, "Quality"); it is what 3 epochs of 1,000 examples train, so no small set costs more than that.
MIN_TRAINED_EXAMPLES = 3_000
MAX_TRAINED_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_AUTO_EPOCHS = 25
MAX_AUTO_BATCH_SIZE = 64
# Caps (docs/job-spec.md "Caps"): OpenAI's limits on epochs and batch size; checkpoints kept and sequence length
# bound what one job may store and ask of a GPU.
MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
MAX_CHECKPOINTS_KEPT = 20
MAX_SEQ_LENGTH = 32_768
# `general_replay` auto: one replayed general answer of the base per REPLAY_PER_EXAMPLES training examples, from
# MIN_REPLAY_EXAMPLES examples on (docs/job-spec.md, "Keeping general answering"), at most the built-in prompts.
REPLAY_PER_EXAMPLES = 8
MIN_REPLAY_EXAMPLES = 64

_STRICT = ConfigDict(extra="forbid")


def _refuse(model: str, field: str, value: object, message: str) -> ValidationError:
    """A validation error located at `field`, so the API's error names the parameter."""
    return ValidationError.from_exception_data(
        model, [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,), input=value)]
    )


class LoraSpec(BaseModel):
    """The adapter: rank, scaling, dropout and which layers it attaches to."""

    model_config = _STRICT

    r: int = Field(16, ge=1, le=1024, description="LoRA rank: the inner dimension of the two low-rank matrices.")
    alpha: int | None = Field(
        None, ge=1, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA); null means 2·r."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input during training.")
    target_modules: list[str] | TargetPreset = Field(
        "all-linear",
        description=(
            "Layers that get an adapter: module names, or a preset resolved per architecture — `attention-qv` "
            "(query and value projections), `attention` (all attention projections), `all-linear` (attention and "
            "MLP; the default: small fact sets are only learnt with the MLP adapted, docs/job-spec.md)."
        ),
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) (opt-in).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower, opt-in.")

    @model_validator(mode="after")
    def _modules_named(self) -> "LoraSpec":
        if isinstance(self.target_modules, list) and not all(m.strip() for m in self.target_modules or [""]):
            raise _refuse("LoraSpec", "target_modules", self.target_modules, "needs at least one non-empty module name")
        return self

    @property
    def effective_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r


class ModelSection(BaseModel):
    """Which base model, and how its frozen weights are held."""

    model_config = _STRICT

    model: str = Field(..., min_length=1, description="Base model id from the catalogue (or a hub id where online).")
    quantization: Literal["auto", "nf4", "fp4", "none"] = Field(
        "auto",
        description=(
            "Frozen base in 4-bit NF4 (QLoRA), 4-bit FP4, or `none` (plain LoRA: bf16 on GPU, bf16 or fp32 on CPU); "
            "`auto` (the default) is `none` where the job's plan fits a configured class with the 16-bit base, else "
            "`nf4` (docs/job-spec.md)."
        ),
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (saves ~0.37 bit/parameter); 4-bit only.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the 4-bit layers' matmuls; `auto` is bf16 on a GPU that supports it, on the CPU what measured fastest there."
    )


class DataSection(BaseModel):
    """How examples become token rows."""

    model_config = _STRICT

    max_seq_length: int = Field(1024, ge=16, le=MAX_SEQ_LENGTH, description="Examples are truncated to this many tokens.")
    packing: bool = Field(
        True, description="Padding-free packing: a micro batch is one row with per-example positions (no cross-attention)."
    )
    train_on_inputs: bool = Field(
        False, description="Also train on system/user/prompt tokens; by default only assistant/completion tokens carry loss."
    )
    chat_template: Literal["auto", "model", "plain", "chatml"] = Field(
        "auto",
        description=(
            "How chat examples become text: `model` (the model's own template), `plain` (role markers with the "
            "tokenizer's BOS/EOS), `chatml` (needs `<|im_start|>`/`<|im_end|>` tokens); `auto` is `model` where the "
            "model has a template, else `plain`. The template used is saved with the adapter."
        ),
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="Share of the training file held out for validation when no validation file is given."
    )
    general_replay: int | Literal["auto"] = Field(
        "auto", description="Built-in general prompts outside the domain (core/general.py, none of the general "
        "questions asked at the end) that the base answers greedily before training; its finished answers train "
        "beside the data, so the adapter keeps answering outside the domain as the base does. Chat data only; 0 "
        f"turns it off. `auto`: one per {REPLAY_PER_EXAMPLES} training examples from {MIN_REPLAY_EXAMPLES} on, at "
        f"most {len(REPLAY_PROMPTS)} (docs/job-spec.md)."
    )


class OptimizationSection(BaseModel):
    """Epochs, batches, learning rate and its schedule."""

    model_config = _STRICT

    n_epochs: int | Literal["auto"] = Field("auto", description="Passes over the training data; `auto` by the written rule.")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Examples per optimizer step (OpenAI's meaning); `auto` by the written rule."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per forward pass; batch_size / micro_batch_size is gradient accumulation."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass (less memory, about a third more compute); "
        "null: as the job's plan chooses for its GPU class (off wherever the micro-batch fits without it)."
    )
    learning_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="Explicit peak learning rate; excludes learning_rate_multiplier."
    )
    learning_rate_multiplier: float | Literal["auto"] = Field(
        "auto", description=f"Peak learning rate = multiplier × {BASE_LEARNING_RATE:g}; `auto` scales it with the batch and the model's width (docs/job-spec.md)."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Share of the steps spent warming the rate up from 0.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay on the adapter weights.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 turns clipping off.")
    neftune_noise_alpha: float | None = Field(
        5.0, gt=0, description="NEFTune: uniform noise on the input embeddings while training, scaled by alpha / "
        "sqrt(L × width), L each example's own length (packed or padded); null: off. 5 (the paper's value) by "
        "default: it held out better on the quality benchmark (docs/job-spec.md)."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds data order, adapter init, dropout and the split.")


class CheckpointSection(BaseModel):
    """Evaluation and checkpoint cadence."""

    model_config = _STRICT

    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps; null: at the end only.")
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N optimizer steps; null: at each epoch end (a worker also "
        "checkpoints every LORAJOBS_CHECKPOINT_INTERVAL_SECONDS of training).")
    save_total_limit: int | None = Field(
        3, ge=1, description="Keep only the newest N checkpoints, and always the best one; at most 20 (null: 20)."
    )
    best_checkpoint_metric: Literal["valid_loss", "valid_mean_token_accuracy"] = Field(
        "valid_loss",
        description="With validation data, every checkpoint is evaluated and the best by this metric is delivered as "
        "the job's adapter (lowest loss, highest accuracy); the others stay downloadable.",
    )
    early_stopping_patience: int | None = Field(
        4, ge=1, description="Stop when the best_checkpoint_metric has not improved for this many checkpoint "
        "evaluations in a row; null trains every epoch."
    )
    early_stopping_threshold: float = Field(
        0.001, ge=0.0, le=1.0, description="The smallest change of best_checkpoint_metric that counts as an "
        "improvement for early stopping (0.001 nats a token of loss: 0.1 % perplexity); the best checkpoint is "
        "still the best by any margin."
    )
    early_stopping_cooldown: float = Field(
        0.2, ge=0.0, le=1.0, description="When early stopping triggers, train on for this share of the steps trained "
        "so far, from the best weights so far, with the learning rate decaying linearly from its current value to 0, "
        "then evaluate, checkpoint and stop (the best checkpoint is still delivered, cooled or not); 0 stops at once."
    )
    answer_samples: int = Field(
        20, ge=0, le=200, description="Held-out prompts answered greedily by the base and the tuned model at the end "
        "of the job, and scored for exact match and key facts; 0 skips it."
    )
    answer_max_new_tokens: int = Field(
        128, ge=1, le=1024, description="Longest answer generated for each of those prompts, in tokens."
    )
    general_samples: int = Field(
        8, ge=0, le=len(GENERAL_QUESTIONS), description="Built-in general questions outside the domain (arithmetic, "
        "places, science: core/general.py), asked with no system prompt of the base and the tuned model after the "
        "held-out sample, in the same time budget: whether general answering survived the tuning. Chat data only; "
        "0 skips them."
    )


class JobSpec(CheckpointSection, OptimizationSection, DataSection, ModelSection):  # fields in reverse base order
    """A fine-tuning job's training configuration (all sections flat, as OpenAI request bodies are)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    lora: LoraSpec = Field(default_factory=LoraSpec, description="The adapter.")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        for name, cap in (("n_epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
            value = getattr(self, name)
            if value != "auto" and not 1 <= value <= cap:
                raise _refuse("JobSpec", name, value, f"must be an integer from 1 to {cap}, or 'auto'")
        if self.save_total_limit is None:
            self.save_total_limit = MAX_CHECKPOINTS_KEPT  # "keep all" keeps the cap: what a job stores is bounded
        elif self.save_total_limit > MAX_CHECKPOINTS_KEPT:
            raise _refuse("JobSpec", "save_total_limit", self.save_total_limit,
                          f"at most {MAX_CHECKPOINTS_KEPT} checkpoints are kept")
        if self.general_replay != "auto" and not 0 <= self.general_replay <= len(REPLAY_PROMPTS):
            raise _refuse("JobSpec", "general_replay", self.general_replay,
                          f"must be an integer from 0 to {len(REPLAY_PROMPTS)} (the built-in prompts), or 'auto'")
        if self.learning_rate_multiplier != "auto" and self.learning_rate_multiplier <= 0:
            raise _refuse("JobSpec", "learning_rate_multiplier", self.learning_rate_multiplier, "must be positive or 'auto'")
        if self.learning_rate is not None and self.learning_rate_multiplier != "auto":
            raise _refuse(
                "JobSpec", "learning_rate_multiplier", self.learning_rate_multiplier,
                "give either learning_rate or learning_rate_multiplier, not both",
            )
        if self.micro_batch_size is not None and self.batch_size != "auto":
            if self.micro_batch_size > self.batch_size or self.batch_size % self.micro_batch_size:
                raise _refuse(
                    "JobSpec", "micro_batch_size", self.micro_batch_size,
                    f"must divide batch_size ({self.batch_size}) exactly",
                )
        if self.quantization in ("none", "auto") and self.compute_dtype == "float16":
            raise _refuse(
                "JobSpec", "compute_dtype", self.compute_dtype,
                "float16 applies to 4-bit layers only (set quantization 'nf4' or 'fp4'); plain LoRA keeps the base "
                "in bf16 (GPU) or bf16/fp32 (CPU)",
            )
        return self


class ResolvedHyperparameters(BaseModel):
    """The concrete numbers a job trained with, and how each `auto` was chosen."""

    n_epochs: int
    batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    learning_rate_multiplier: float | None
    general_replay: int = 0
    auto_rules: dict[str, str] = Field(default_factory=dict)


def _floor_power_of_two(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(x))) if x >= 1 else 1


def _auto_epochs(n: int) -> tuple[int, str]:
    if n * DEFAULT_EPOCHS < MIN_TRAINED_EXAMPLES:
        epochs = min(MAX_AUTO_EPOCHS, math.ceil(MIN_TRAINED_EXAMPLES / n))
        return epochs, f"{n} examples × 3 < {MIN_TRAINED_EXAMPLES}: ceil({MIN_TRAINED_EXAMPLES}/{n}) capped at {MAX_AUTO_EPOCHS} = {epochs}"
    if n * DEFAULT_EPOCHS > MAX_TRAINED_EXAMPLES:
        epochs = max(1, MAX_TRAINED_EXAMPLES // n)
        return epochs, f"{n} examples × 3 > {MAX_TRAINED_EXAMPLES}: max(1, {MAX_TRAINED_EXAMPLES}//{n}) = {epochs}"
    return DEFAULT_EPOCHS, f"{n} examples × 3 lies within [{MIN_TRAINED_EXAMPLES}, {MAX_TRAINED_EXAMPLES}]: 3"


def _auto_batch_size(n: int) -> tuple[int, str]:
    floor = min(MIN_AUTO_BATCH_SIZE, _floor_power_of_two(n / 4))
    size = min(MAX_AUTO_BATCH_SIZE, max(floor, _floor_power_of_two(n / 100)))
    return size, (f"largest power of two <= {n}/100, at least min({MIN_AUTO_BATCH_SIZE}, largest power of two <= "
                  f"{n}/4) = {floor}, capped at {MAX_AUTO_BATCH_SIZE} = {size}")


def model_width(config: dict | None) -> int | None:
    """The language model's hidden width from a `config.json` dict (a multimodal one's text model), if it says."""
    if not config:
        return None
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _auto_multiplier(batch_size: int, width: int | None) -> tuple[float, str]:
    batch_factor = min(2.0, max(0.5, math.sqrt(batch_size / DEFAULT_MICRO_BATCH_SIZE)))
    width_factor = (REFERENCE_WIDTH / width) ** WIDTH_EXPONENT if width else 1.0
    multiplier = round(min(MAX_AUTO_MULTIPLIER, max(MIN_AUTO_MULTIPLIER, batch_factor * width_factor)), 4)
    width_rule = (f" × (width {REFERENCE_WIDTH} / {width})^{WIDTH_EXPONENT}" if width
                  else " (the model's width unknown: taken as 4096)")
    return multiplier, (f"sqrt(batch_size {batch_size} / {DEFAULT_MICRO_BATCH_SIZE}) within [0.5, 2]{width_rule}, clamped to "
                        f"[{MIN_AUTO_MULTIPLIER:g}, {MAX_AUTO_MULTIPLIER:g}] = {multiplier:g}")


def _auto_replay(n: int) -> tuple[int, str]:
    if n < MIN_REPLAY_EXAMPLES:
        return 0, f"{n} examples < {MIN_REPLAY_EXAMPLES}: 0"
    count = min(len(REPLAY_PROMPTS), n // REPLAY_PER_EXAMPLES)
    return count, f"{n} examples // {REPLAY_PER_EXAMPLES}, at most {len(REPLAY_PROMPTS)} = {count}"


def _micro_batch_size(batch_size: int, cap: int) -> int:
    """The largest divisor of batch_size that is at most `cap`."""
    return max(d for d in range(1, min(batch_size, cap) + 1) if batch_size % d == 0)


def resolve_auto(spec: JobSpec, n_train_examples: int, width: int | None = None) -> ResolvedHyperparameters:
    """Concrete epochs, batch sizes and learning rate for `n_train_examples` examples on a model `width` wide (its
    hidden size, `model_width`), with the rule for each auto."""
    n = max(1, n_train_examples)
    rules: dict[str, str] = {}
    n_epochs = spec.n_epochs
    if n_epochs == "auto":
        n_epochs, rules["n_epochs"] = _auto_epochs(n)
    batch_size = spec.batch_size
    if batch_size == "auto":
        batch_size, rules["batch_size"] = _auto_batch_size(n)
    micro = spec.micro_batch_size
    if micro is None or batch_size % micro:
        cap = micro or DEFAULT_MICRO_BATCH_SIZE
        micro = _micro_batch_size(batch_size, cap)
        rules["micro_batch_size"] = f"largest divisor of batch_size {batch_size} that is <= {cap} = {micro}"
    multiplier: float | None = None
    if spec.learning_rate is not None:
        learning_rate = spec.learning_rate
    else:
        multiplier = spec.learning_rate_multiplier
        if multiplier == "auto":
            multiplier, rules["learning_rate_multiplier"] = _auto_multiplier(batch_size, width)
        learning_rate = multiplier * BASE_LEARNING_RATE
    replay = spec.general_replay
    if replay == "auto":
        replay, rules["general_replay"] = _auto_replay(n)
    return ResolvedHyperparameters(
        n_epochs=n_epochs,
        batch_size=batch_size,
        micro_batch_size=micro,
        gradient_accumulation_steps=batch_size // micro,
        learning_rate=learning_rate,
        learning_rate_multiplier=multiplier,
        general_replay=replay,
        auto_rules=rules,
    )
