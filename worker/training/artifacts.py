"""Save: the result, the model card and the training log that go with an adapter."""

import csv
import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lorajobs")
LOG_COLUMNS = ("step", "epoch", "train_loss", "learning_rate", "grad_norm", "tokens_seen", "valid_loss", "valid_mean_token_accuracy")


@dataclass
class TrainingResult:
    """What a training run produced; `to_dict()` is JSON-serialisable."""

    adapter_dir: Path
    status: str  # "succeeded" | "cancelled"
    trained_tokens: int
    steps: int
    total_steps: int
    hyperparameters: dict
    baseline_eval: dict | None
    final_eval: dict | None
    dropped_examples: dict
    n_train_examples: int
    n_valid_examples: int
    truncated_examples: int
    data_sha256: dict
    parameters: dict = field(default_factory=dict)  # trainable_parameters, total_parameters, trainable_percent
    served_eval: dict | None = None  # QLoRA: the adapter on the full-precision base and both merges (pipeline)
    chat_template: str = "model"  # the template the adapter was trained with (saved beside it)
    base_provenance: str | None = None  # where the base's weights came from, when not the hub's checkpoint
    library_versions: dict = field(default_factory=dict)
    train_seconds: float | None = None  # wall clock around the Trainer's train(), setup excluded (benchmarks compare it)
    best_checkpoint: dict | None = None  # the checkpoint delivered as the adapter, chosen on validation (best.py)
    quality: dict | None = None  # exact match and key facts over the held-out sample, base and tuned (answers.py)
    answers: list | None = None  # that sample: prompt, expected, base and tuned answers with their scores
    compute: str | None = None  # the compute path and why (worker/training/compute.py)
    quantization: str = "none"  # the base's: the spec's, or what `auto` chose (core/planning/plan.py)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def log_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step from the Trainer's log history (train logs and our evaluations merged)."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        if "loss" not in entry and "valid_loss" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        if "loss" in entry:
            row.update(
                epoch=entry.get("epoch"), train_loss=entry["loss"], learning_rate=entry.get("learning_rate"),
                grad_norm=entry.get("grad_norm"), tokens_seen=entry.get("num_input_tokens_seen"),
            )
        else:
            row.update(valid_loss=entry["valid_loss"], valid_mean_token_accuracy=entry["valid_mean_token_accuracy"])
    return [rows[step] for step in sorted(rows)]


def write_training_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


SERVED_LABELS = {
    "adapter_on_full_precision_base": "adapter on the full-precision base (as vLLM, TGI or PEFT serve it)",
    "merged_full_precision": "merged into the full-precision base",
    "merged_dequantized_4bit": "merged into the dequantized 4-bit base",
}


def eval_rows(result: "TrainingResult") -> list[tuple[str, dict | None]]:
    """The evaluations a model card shows, labelled; QLoRA adds where the adapter is served and both merges."""
    trained_on = "with adapter (on the 4-bit base it was trained on)" if result.served_eval else "with adapter"
    rows = [("base model", result.baseline_eval), (trained_on, result.final_eval)]
    rows += [(label, (result.served_eval or {}).get(key)) for key, label in SERVED_LABELS.items()]
    return rows


def parameter_lines(parameters: dict) -> list[str]:
    if not parameters:
        return []
    return [f"- trainable: {parameters['trainable_parameters']:,} of {parameters['total_parameters']:,} "
            f"({parameters['trainable_percent']:.4f} %)"]


def served_lines(served: dict | None) -> list[str]:
    if not served:
        return []
    base = "the dequantized 4-bit base" if served["merge_base"] == "dequantized_4bit" else "the full-precision base"
    return [f"The merged export folds the adapter into {base}, the better-scoring of the two merges.", ""]


def quality_lines(result: TrainingResult) -> list[str]:
    """Which checkpoint the adapter is, and how its answers to held-out prompts scored."""
    from worker.training.answers import quality_message

    lines = []
    if result.best_checkpoint:
        best = result.best_checkpoint
        cooled = (f"; early stopping, then the learning rate cooled to 0 from the weights of step {best['cooled_from']}"
                  if best.get("cooled_from") else "")
        lines.append(f"The adapter is the checkpoint of step {best['step']} (the last step was {best['last_step']}"
                     f"{cooled}), the best by {best['metric']} ({best['value']:.4f}).")
    if result.quality:
        lines.append(quality_message(result.quality))
    return [*lines, ""] if lines else []


def write_model_card(adapter_dir: Path, spec_json: dict, result: TrainingResult) -> None:
    """The adapter's README.md: base model, data checksums, spec, metrics and library versions."""
    base = spec_json["model"]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lora, lorajobs]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        f"Trained by lorajobs ({result.status}, {result.steps} of {result.total_steps} steps, "
        f"{result.trained_tokens} tokens). Load it with `PeftModel.from_pretrained(base, this_folder)`.",
        "",
        *([f"Base model provenance: {result.base_provenance}", ""] if result.base_provenance else []),
        "## Data",
        "",
        *[f"- {name}: sha256 `{digest}`" for name, digest in result.data_sha256.items()],
        f"- training examples: {result.n_train_examples}, validation examples: {result.n_valid_examples}, "
        f"dropped: {result.dropped_examples['count']}, truncated: {result.truncated_examples}",
        "",
        "## Parameters",
        "",
        *parameter_lines(result.parameters),
        "",
        f"Chat template: `{result.chat_template}` (saved beside the adapter as `chat_template.jinja`).",
        "",
        *([f"Compute: {result.compute}.", ""] if result.compute else []),
        "## Metrics (validation)",
        "",
        "| | loss | token accuracy |",
        "|---|---|---|",
        *[f"| {label} | {ev['loss']:.4f} | {ev['token_accuracy']:.4f} |" for label, ev in eval_rows(result) if ev],
        "",
        *served_lines(result.served_eval),
        *quality_lines(result),
        "## Spec",
        "",
        "```json",
        json.dumps(spec_json, indent=2),
        "```",
        "",
        "## Resolved hyperparameters",
        "",
        "```json",
        json.dumps(result.hyperparameters, indent=2),
        "```",
        "",
        "## Library versions",
        "",
        *[f"- {name} {ver}" for name, ver in result.library_versions.items()],
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines))
