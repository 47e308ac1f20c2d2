"""The new-job form: its fields with the job spec's own defaults and descriptions, and the body it submits."""

from dataclasses import dataclass
from typing import Any, get_args

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from api.schemas_jobs import JobCreate
from core.errors import InvalidRequest, LorajobsError
from core.spec import JobSpec, LoraSpec
from db.models import Job

TARGET_PRESETS = ("attention-qv", "attention", "all-linear")
QUANTIZATIONS = get_args(JobSpec.model_fields["quantization"].annotation)  # `auto` first: the default
# Where the API may name a knob the form shows under another name.
PARAM_ALIASES = {"method.supervised.hyperparameters.": "", "hyperparameters.": ""}


@dataclass
class FormField:
    name: str  # the job spec's parameter, as the API's errors name it (`lora.r`)
    label: str
    kind: str  # select | number | text
    default: str
    help: str
    placeholder: str = ""
    options: tuple[str, ...] = ()
    advanced: bool = False


def _shown(value: Any) -> str:
    if value is None:
        return ""
    return ", ".join(value) if isinstance(value, list) else str(value)


def _spec_field(name: str, label: str, kind: str, *, info: FieldInfo | None = None, placeholder: str = "",
                options: tuple[str, ...] = (), advanced: bool = False) -> FormField:
    info = info or JobSpec.model_fields[name]
    default = info.get_default(call_default_factory=True)
    return FormField(name, label, kind, _shown(default), info.description or "", placeholder, options, advanced)


def knob_fields() -> list[FormField]:
    """The common knobs, pre-filled with the spec's defaults (never restated here)."""
    lora = LoraSpec.model_fields
    return [
        _spec_field("quantization", "Quantization", "select", options=QUANTIZATIONS),
        _spec_field("lora.r", "LoRA rank r", "number", info=lora["r"]),
        _spec_field("lora.alpha", "LoRA alpha", "number", info=lora["alpha"], placeholder="2 × r"),
        _spec_field("lora.target_modules", "Target modules", "text", info=lora["target_modules"]),
        _spec_field("n_epochs", "Epochs", "text"),
        _spec_field("learning_rate", "Learning rate", "text", placeholder="auto"),
        _spec_field("max_seq_length", "Max sequence length", "number"),
        _spec_field("batch_size", "Batch size", "text", advanced=True),
        _spec_field("eval_steps", "Evaluate every N steps", "number", placeholder="at the end", advanced=True),
        _spec_field("save_steps", "Checkpoint every N steps", "number", placeholder="each epoch", advanced=True),
    ]


def _value(text: str) -> int | float | str:
    """A typed number when the text is one; otherwise the text, for the spec to refuse with its own message."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _target_modules(text: str) -> str | list[str]:
    if text in TARGET_PRESETS:
        return text
    return [name.strip() for name in text.split(",")]


def job_create(form: dict[str, str], *, dry_run: bool = False) -> JobCreate:
    """The API's create body from the submitted form (only its plan with `dry_run`); an empty knob keeps the spec's
    default."""
    knobs: dict[str, Any] = {}
    for knob in knob_fields():
        text = form.get(knob.name, "").strip()
        if not text:
            continue
        value = _target_modules(text) if knob.name == "lora.target_modules" else _value(text)
        section, _, inner = knob.name.partition(".")
        if inner:
            knobs.setdefault(section, {})[inner] = value
        else:
            knobs[section] = value
    body = {"model": form.get("model", ""), "training_file": form.get("training_file", ""),
            "validation_file": form.get("validation_file") or None, "suffix": form.get("suffix") or None, **knobs}
    if dry_run:
        body["dry_run"] = True
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(f"{param}: {error['msg']}", param=param) from None


def values_of_job(job: Job) -> dict[str, str]:
    """The form filled to create `job` again: its model, files, suffix and each knob as its spec asked it."""
    spec = job.spec or {}
    values = {"model": job.model, "training_file": job.training_file_id,
              "validation_file": job.validation_file_id or "", "suffix": job.suffix or ""}
    for knob in knob_fields():
        section, _, inner = knob.name.partition(".")
        value = (spec.get(section) or {}).get(inner) if inner else spec.get(section)
        values[knob.name] = _shown(value)
    return values


def field_for_param(param: str | None, names: list[str]) -> str | None:
    """The form field an API error's `param` points at (`lora.r`, `n_epochs.int` → `n_epochs`), if any."""
    if not param:
        return None
    for prefix, replacement in PARAM_ALIASES.items():
        if param.startswith(prefix):
            param = replacement + param[len(prefix):]
    matches = [name for name in names if param == name or param.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def inline_message(error: LorajobsError) -> str:
    """The error without its `param: ` prefix: shown next to the field, the field names it already."""
    prefix = f"{error.param}: " if error.param else ""
    return error.message.removeprefix(prefix) if prefix else error.message
