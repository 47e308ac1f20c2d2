"""Request and response shapes of the fine-tuning jobs API (OpenAI's, plus our extensions)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

AutoInt = int | Literal["auto"]
AutoFloat = float | Literal["auto"]
# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# `"` and `\` cannot be keys: a JSON path in SQLite's filter cannot name them (a `metadata[k]` filter uses one).
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=METADATA_KEY_CHARS, pattern=r'^[^"\\]+$')]
MetadataValue = Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=METADATA_PAIRS)]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: AutoInt | None = None
    batch_size: AutoInt | None = None
    learning_rate_multiplier: AutoFloat | None = None


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(BaseModel):
    """OpenAI's create body; any other field is a job-spec field (docs/job-spec.md), e.g. `quantization`, `lora`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., description="A base model id from the catalogue (`GET /v1/models`).")
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI in favour of `method`.")
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    metadata: Metadata | None = Field(None, description="Up to 16 pairs; keys up to 64 characters, values 512.")
    integrations: list[dict[str, Any]] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    percent: float = 0.0
    epoch: float | None = None
    train_loss: float | None = None
    tokens_per_second: float | None = None


class ServedEval(BaseModel):
    """A QLoRA adapter scored as it is served, not only on the 4-bit base it was trained on."""

    adapter_on_full_precision_base_loss: float
    merged_full_precision_loss: float
    merged_dequantized_4bit_loss: float
    merge_base: Literal["full_precision", "dequantized_4bit"]


class QualityFigures(BaseModel):
    """Answers to held-out prompts scored against the expected ones (core/quality.py)."""

    answers: int
    exact_match: float | None = Field(None, description="Share of answers equal to the expected one")
    answers_with_facts: int = Field(0, description="Answers whose expected answer has numbers, codes or quoted terms")
    key_facts: float | None = Field(None, description="Share of those answers that state all of them")
    fact_recall: float | None = Field(None, description="Share of all key facts stated")


class GeneralQuality(BaseModel):
    """The built-in general questions outside the domain (core/general.py), asked with no system prompt."""

    sample: int
    answered: int = Field(description="Fewer than the sample when the time budget ran out")
    max_new_tokens: int = Field(description="answer_max_new_tokens, at most 64")
    seconds: float
    base: QualityFigures
    tuned: QualityFigures


class Quality(BaseModel):
    """Greedy answers of the base and the tuned model to a fixed sample of held-out prompts
    (`GET /v1/fine_tuning/jobs/{id}/answers`)."""

    sample: int
    answered: int = Field(description="Fewer than the sample when the time budget ran out")
    max_new_tokens: int
    seconds: float
    base: QualityFigures
    tuned: QualityFigures
    general: GeneralQuality | None = Field(
        None, description="The same figures on the spec's general_samples built-in general questions: whether "
        "answering outside the domain survived the tuning")


class DeliveredCheckpoint(BaseModel):
    """The checkpoint delivered as the job's adapter: the best by the spec's best_checkpoint_metric."""

    step: int
    metric: str
    value: float
    last_step: int
    early_stopped: bool
    cooled_from: int | None = Field(
        None, description="When early stopping cooled the learning rate to 0 before it stopped (ending at last_step): "
        "the step whose weights it cooled, the best before patience ran out; null when it stopped at once or did not "
        "stop early."
    )


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: Method
    suffix: str | None = None
    # Our extensions.
    quantization: str
    lora: dict[str, Any]
    max_seq_length: int
    learning_rate: float | None = None
    spec: dict[str, Any]
    resolved_hyperparameters: dict[str, Any] | None = None
    progress: Progress | None = None
    baseline_eval_loss: float | None = None
    final_eval_loss: float | None = None
    adapter_sha256: str | None = None
    trainable_parameters: int | None = Field(None, description="LoRA weights trained, as PEFT counts them")
    total_parameters: int | None = Field(None, description="All weights of base plus adapter, as PEFT counts them")
    trainable_percent: float | None = None
    chat_template: str | None = Field(None, description="The template trained with: model, plain or chatml")
    served_eval: ServedEval | None = Field(
        None, description="QLoRA: held-out loss where the adapter is served, of both merges, and which one is exported")
    quality: Quality | None = Field(None, description="Exact match and key facts on held-out prompts, base and tuned")
    delivered_checkpoint: DeliveredCheckpoint | None = Field(
        None, description="Which checkpoint the adapter is, when chosen on validation data")
    cancel_requested: bool = False
    pause_requested: bool = False
    attempts: int = 0
    resends: int = Field(0, description="Times the sweeper sent the job's message again because no worker had taken "
                         "it by its deadline (lost by the broker, or waiting behind other jobs); never spends attempts")
    plan: dict[str, Any] | None = Field(
        None, description="The pre-flight plan (`fine_tuning.job.plan`): parameters, memory per class, duration")
    placement: dict[str, Any] | None = Field(
        None, description="Where it trains: queue, class, micro-batch, checkpointing; measured peak memory once run")
    queue_position: int | None = Field(None, description="Queued: its place in its queue, 1 = next")


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class AnswerObject(BaseModel):
    object: Literal["fine_tuning.job.answer"] = "fine_tuning.job.answer"
    prompt: str
    expected: str
    base: str
    tuned: str
    base_score: dict[str, Any]
    tuned_score: dict[str, Any]
    part: Literal["held_out", "general"] = Field(
        "held_out", description="A held-out prompt of the validation data, or a built-in general question")


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    # On the delivered checkpoint: its answers to the held-out sample (the job's `quality.tuned`).
    exact_match: float | None = None
    key_facts: float | None = None
    fact_recall: float | None = None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
    sha256: str
