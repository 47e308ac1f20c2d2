"""Model and adapter: the spec as LoraConfig / BitsAndBytesConfig, loading the base, the 4-bit CPU trap guard."""

import json
from pathlib import Path

from core.architectures import check_quantization, resolve_targets
from core.errors import InvalidRequest, LorajobsError
from core.spec import JobSpec
from core.templates import BUILT_IN, CHATML_TOKENS, built_in_template, resolve_choice
from worker.catalogue import model_source
from worker.training.compute import compute_path

GRADIENT_CHECKPOINTING = {"use_reentrant": False}


class QuantizedLayoutError(LorajobsError):
    """A 4-bit weight was repacked for CPU inference; training it would silently lose gradients."""

    status_code = 500
    error_type = "server_error"
    code = "quantized_layout"


def to_lora_config(spec: JobSpec, model_config: dict):
    """The spec's adapter as a `peft.LoraConfig` for a model's config (no modules_to_save: vLLM cannot load them).

    Target modules come from the per-architecture registry (core/architectures.py); an architecture missing there
    gets peft's own default for it.
    """
    from peft import LoraConfig

    targets = resolve_targets(model_config, spec.lora.target_modules)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        lora_alpha=spec.lora.effective_alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets.modules,
        use_rslora=spec.lora.use_rslora,
        use_dora=spec.lora.use_dora,
        bias="none",
    )


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(spec: JobSpec, device: str):
    """The dtype of the 4-bit layers' matmuls: the spec's, or on `auto` what measured fastest on this CPU (fp32 on
    an AVX2 EPYC, where bitsandbytes' bf16 ran 43x slower), bf16 on a GPU that supports it, else fp16."""
    import torch

    return getattr(torch, compute_path(spec, device).choice)


def compute_description(spec: JobSpec, device: str) -> str:
    """The compute path chosen and why, for the job's events and model card."""
    return compute_path(spec, device).description()


def base_dtype(spec: JobSpec, device: str):
    """The dtype the base is loaded in: bf16 on a GPU that supports it (else fp16); on the CPU fp32, or bf16 where
    plain LoRA measured fastest with bf16 weights (worker/training/compute.py)."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, compute_path(spec, device).cpu_base_dtype)


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


def _generation_eos_ids(source: str) -> tuple[int, ...]:
    """The EOS ids of the model's generation config (Llama-3, Qwen2, Phi-3 and Gemma list their end-of-turn there)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except (OSError, ValueError):
        return ()
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())


def load_tokenizer(model_id: str, models_dir: Path, chat_template: str = "auto"):
    """The base model's tokenizer with the job's chat template set and a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    source = model_source(models_dir, model_id)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.is_fast:
        raise InvalidRequest(f"The model '{model_id}' has no fast tokenizer (tokenizer.json); labels need its "
                             "character offsets.", param="model", code="unsupported_tokenizer")
    choice = resolve_choice(chat_template, bool(tokenizer.chat_template))
    if choice == "model" and not tokenizer.chat_template:
        raise InvalidRequest(f"The model '{model_id}' has no chat template; use chat_template 'plain' or 'chatml'.",
                             param="chat_template", code="no_chat_template")
    if choice == "chatml" and not all(t in tokenizer.get_vocab() for t in CHATML_TOKENS):
        raise InvalidRequest(f"The model '{model_id}' has no <|im_start|>/<|im_end|> tokens for chat_template "
                             "'chatml'; use 'plain'.", param="chat_template", code="no_chat_template")
    if choice in BUILT_IN:
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        tokenizer.chat_template = built_in_template(choice, bos_token=tokenizer.bos_token if adds_bos else None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.lorajobs_generation_eos_ids = _generation_eos_ids(source)
    tokenizer.lorajobs_chat_template = choice
    return tokenizer


def pin_4bit_training_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for fast CPU inference, so evaluation mid-training is safe.

    On a CPU with AVX512-BF16, a no-grad forward of `Linear4bit` in eval mode rewrites its weight into a
    layout whose matmul has no backward: training after it silently loses the base's gradient path.
    """
    import bitsandbytes as bnb

    layers = [layer for layer in model.modules() if isinstance(layer, bnb.nn.Linear4bit)]
    if not layers:  # an architecture transformers does not quantize: training it would silently be 16-bit LoRA
        raise InvalidRequest(f"transformers left no layer of {model.config.model_type} in 4 bits; use quantization "
                             "'none'.", param="quantization", code="quantization_unsupported")
    for layer in layers:
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


def base_config(model_id: str, models_dir: Path) -> dict:
    """The base model's `config.json` as a dict (read, nothing loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_source(models_dir, model_id)).to_dict()


def load_base_model(spec: JobSpec, models_dir: Path, device: str, gradient_checkpointing: bool | None = None):
    """Load model: the frozen base, 4-bit and prepared for k-bit training when the spec quantizes it.

    Activations are recomputed when the job's plan says so (4-bit or not: recomputing is exact, it only trades a
    third more compute for memory); without a plan, always on a GPU and never on the CPU.
    """
    from transformers import AutoModelForCausalLM

    source = model_source(models_dir, spec.model)
    bnb_config = to_bnb_config(spec, device)
    kwargs = {"dtype": base_dtype(spec, device)}
    if bnb_config is not None:
        check_quantization(base_config(spec.model, models_dir), spec.quantization)
        kwargs.update(quantization_config=bnb_config, device_map={"": 0} if device == "cuda" else {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.config.use_cache = False  # padding-free packing is only correct without the KV cache
    checkpointing = gradient_checkpointing if gradient_checkpointing is not None else device == "cuda"
    if bnb_config is not None:
        from peft import prepare_model_for_kbit_training

        pin_4bit_training_layout(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING
        )
    elif checkpointing:
        # A bf16 7B with plain LoRA fits a 24 GB card at the default length only with recomputed activations.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING)
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointed blocks
    return model


def attach_adapter(model, spec: JobSpec):
    """Attach adapter: a fresh LoRA adapter on the frozen base."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, to_lora_config(spec, model.config.to_dict()))
    except ValueError as exc:  # peft found none of the named layers: the user's to fix, not a retry
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if type(module).__name__ in ("Linear", "Linear4bit", "Conv1D")} - {"lm_head"})
        raise InvalidRequest(f"{exc} This model's linear layers: {', '.join(linear)}.",
                             param="lora.target_modules", code="invalid_target_modules") from None


def name_base_model(adapter_dir: Path, model_id: str) -> None:
    """Point a saved adapter at the catalogue id, never a local path (DESIGN.md, decision 6).

    Rewritten after saving rather than set on the live config: peft's save looks a non-path name up on the hub.
    """
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = model_id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_full_precision_base(model_id: str, models_dir: Path, dtype="auto"):
    """The catalogue's base in its own dtype (bf16 stays bf16) or `dtype`, never 4-bit: what an adapter is served on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_source(models_dir, model_id), dtype=dtype)


def load_adapter_model(adapter_dir: Path, models_dir: Path):
    """The base from the catalogue in its own dtype (bf16 stays bf16) with the saved adapter on it, for inference or merging.

    Never a 4-bit base: merging into one destroys the adapter's effect (DESIGN.md).
    """
    from peft import PeftConfig, PeftModel

    base = load_full_precision_base(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, models_dir)
    return PeftModel.from_pretrained(base, adapter_dir)


def adapter_tokenizer(adapter_dir: Path, models_dir: Path):
    """The tokenizer saved with the adapter (it carries the chat template used in training), else the base's."""
    from peft import PeftConfig
    from transformers import AutoTokenizer

    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter_dir)
    return load_tokenizer(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, models_dir)


def load_dequantized_base(spec: JobSpec, models_dir: Path, device: str):
    """The base quantized to 4 bits as in training, then dequantized to 16 bit: the weights the adapter learned on."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_source(models_dir, spec.model), quantization_config=to_bnb_config(spec, device),
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        device_map={"": 0} if device == "cuda" else {"": "cpu"})
    return model.dequantize()


def merge_adapter(adapter_dir: Path, out_dir: Path, models_dir: Path, *, dequantized: JobSpec | None = None) -> Path:
    """Merge the adapter into its full-precision base, or into the dequantized 4-bit base of `dequantized`'s spec
    (never into a 4-bit one), and save a normal HF model folder."""
    from peft import PeftModel

    if dequantized is not None:
        base = load_dequantized_base(dequantized, models_dir, pick_device())
        model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    else:
        model = load_adapter_model(Path(adapter_dir), models_dir).merge_and_unload()
    model.save_pretrained(out_dir)
    adapter_tokenizer(Path(adapter_dir), models_dir).save_pretrained(out_dir)
    return Path(out_dir)
