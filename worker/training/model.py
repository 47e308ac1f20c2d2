"""Model and adapter: the spec as LoraConfig / BitsAndBytesConfig, loading the base, the 4-bit CPU trap guard."""

import json
from pathlib import Path

from core.errors import LorajobsError
from core.spec import JobSpec
from worker.catalogue import model_source

# Attention projections per architecture (DESIGN.md: Falcon's attention is one fused layer).
ATTENTION_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "falcon": ["query_key_value", "dense"],
}
QUERY_VALUE_MODULES = {"falcon": ["query_key_value"]}


class QuantizedLayoutError(LorajobsError):
    """A 4-bit weight was repacked for CPU inference; training it would silently lose gradients."""

    status_code = 500
    error_type = "server_error"
    code = "quantized_layout"


def target_modules(spec: JobSpec, model_type: str) -> list[str] | str:
    """The module names (or peft's `all-linear`) the spec's target_modules means for `model_type`."""
    preset = spec.lora.target_modules
    if isinstance(preset, list):
        return preset
    if preset == "all-linear":
        return "all-linear"
    attention = ATTENTION_MODULES.get(model_type, ATTENTION_MODULES["llama"])
    if preset == "attention":
        return attention
    return QUERY_VALUE_MODULES.get(model_type, ["q_proj", "v_proj"])


def to_lora_config(spec: JobSpec, model_type: str):
    """The spec's adapter as a `peft.LoraConfig` (no modules_to_save: vLLM cannot load them)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        lora_alpha=spec.lora.effective_alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=target_modules(spec, model_type),
        use_rslora=spec.lora.use_rslora,
        use_dora=spec.lora.use_dora,
        bias="none",
    )


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(spec: JobSpec, device: str):
    """The dtype of the 4-bit layers' matmuls: bf16 where the device supports it (every CPU torch runs on does)."""
    import torch

    if spec.compute_dtype != "auto":
        return getattr(torch, spec.compute_dtype)
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def base_dtype(device: str):
    """The dtype the base is loaded in: bf16 on a GPU that supports it, fp32 on the CPU (where bf16 training is slow)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def to_bnb_config(spec: JobSpec, device: str):
    """The spec's quantization as a `BitsAndBytesConfig`, or None for plain LoRA."""
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(spec, device),
    )


def load_tokenizer(model_id: str, models_dir: Path):
    """The base model's tokenizer, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(models_dir, model_id))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pin_4bit_training_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for fast CPU inference, so evaluation mid-training is safe.

    On a CPU with AVX512-BF16, a no-grad forward of `Linear4bit` in eval mode rewrites its weight into a
    layout whose matmul has no backward: training after it silently loses the base's gradient path.
    """
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def check_4bit_layout(model) -> None:
    """Fail loudly if any 4-bit weight was repacked for CPU inference (DESIGN.md, the CPU 4-bit trap)."""
    import bitsandbytes as bnb

    repacked = [
        name for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
        and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if repacked:
        raise QuantizedLayoutError(
            f"{len(repacked)} 4-bit weights (first: {repacked[0]}) were repacked by an inference pass before "
            "training; training them would lose gradients. Load the model afresh and train before any inference."
        )


def load_base_model(spec: JobSpec, models_dir: Path, device: str):
    """Load model: the frozen base, 4-bit and prepared for k-bit training when the spec quantizes it."""
    from transformers import AutoModelForCausalLM

    bnb_config = to_bnb_config(spec, device)
    kwargs = {"dtype": base_dtype(device)}
    if bnb_config is not None:
        kwargs.update(quantization_config=bnb_config, device_map={"": 0} if device == "cuda" else {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(model_source(models_dir, spec.model), **kwargs)
    model.config.use_cache = False  # padding-free packing is only correct without the KV cache
    if bnb_config is not None:
        from peft import prepare_model_for_kbit_training

        pin_4bit_training_layout(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model


def attach_adapter(model, spec: JobSpec):
    """Attach adapter: a fresh LoRA adapter on the frozen base."""
    from peft import get_peft_model

    return get_peft_model(model, to_lora_config(spec, model.config.model_type))


def name_base_model(adapter_dir: Path, model_id: str) -> None:
    """Point a saved adapter at the catalogue id, never a local path (DESIGN.md, decision 6).

    Rewritten after saving rather than set on the live config: peft's save looks a non-path name up on the hub.
    """
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = model_id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter_model(adapter_dir: Path, models_dir: Path):
    """A full-precision base from the catalogue with the saved adapter on it, for inference or merging."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_id = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(model_source(models_dir, base_id), dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir)


def merge_adapter(adapter_dir: Path, out_dir: Path, models_dir: Path) -> Path:
    """Merge the adapter into its full-precision base (never a 4-bit one) and save a normal HF model folder."""
    from peft import PeftConfig

    model = load_adapter_model(Path(adapter_dir), models_dir).merge_and_unload()
    model.save_pretrained(out_dir)
    load_tokenizer(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, models_dir).save_pretrained(out_dir)
    return Path(out_dir)
