"""Per-architecture facts, torch-free: which linear layers a LoRA preset means for each `model_type`.

One registry serves the API (a job's target modules are checked against the catalogue model's
`config.json` before anything queues), the worker (the names handed to `peft.LoraConfig`) and the
planner. A `model_type` missing here falls back to peft's own default mapping in the worker, for the
`attention-qv` and `all-linear` presets only. docs/job-spec.md has the table.
"""

from dataclasses import dataclass

from core.errors import InvalidRequest

# Serving engines (vLLM, LoRAX, TGI) refuse adapters that train or replace these.
REFUSED_MODULES = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "word_embeddings")


@dataclass(frozen=True)
class Architecture:
    """The linear layers of one decoder block, by role, as the module names peft matches."""

    attention: tuple[str, ...]
    query_value: tuple[str, ...]
    mlp: tuple[str, ...]
    note: str = ""
    no_4bit: str = ""  # why transformers cannot hold this architecture's base in 4 bits, when it cannot

    @property
    def linear(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.attention + self.mlp))


_LLAMA = Architecture(("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"))
_NEOX = Architecture(("query_key_value", "dense"), ("query_key_value",), ("dense_h_to_4h", "dense_4h_to_h"),
                     note="query, key and value are one fused layer")
_FALCON = Architecture(
    _NEOX.attention, _NEOX.query_value, _NEOX.mlp, note=_NEOX.note,
    no_4bit="transformers 5 quantizes only plain nn.Linear layers and Falcon's are FalconLinear, so its base would "
            "silently stay in 16 bit")

ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "cohere",
         "granite", "stablelm"), _LLAMA),
    "mixtral": Architecture(_LLAMA.attention, _LLAMA.query_value, (),
                            note="experts are fused 3-D weights in transformers 5, not linear layers: only attention"),
    "qwen3_moe": Architecture(_LLAMA.attention, _LLAMA.query_value, (),
                              note="experts are fused 3-D weights in transformers 5, not linear layers: only attention"),
    "falcon": _FALCON,
    "gpt_neox": _NEOX,
    "phi3": Architecture(("qkv_proj", "o_proj"), ("qkv_proj",), ("gate_up_proj", "down_proj"),
                         note="query, key and value are one fused layer; so are gate and up"),
    "phi": Architecture(("q_proj", "k_proj", "v_proj", "dense"), ("q_proj", "v_proj"), ("fc1", "fc2")),
    "gpt2": Architecture(("c_attn", "c_proj"), ("c_attn",), ("c_fc", "c_proj"),
                         note="query, key and value are one fused Conv1D; `c_proj` names both attention and MLP outputs"),
    "gpt_bigcode": Architecture(("c_attn", "c_proj"), ("c_attn",), ("c_fc", "c_proj"),
                                note="query, key and value are one fused layer; `c_proj` is both outputs"),
    "starcoder2": Architecture(_LLAMA.attention, _LLAMA.query_value, ("c_fc", "c_proj")),
}

# Multimodal checkpoints whose language model sits under `language_model`: only it gets adapters.
LANGUAGE_MODEL_SCOPE = r".*language_model.*\."

PRESET_ROLES = {"attention-qv": "query_value", "attention": "attention", "all-linear": "linear"}


@dataclass(frozen=True)
class ResolvedTargets:
    """What peft's `target_modules` will be: names, a regex (multimodal), `all-linear`, or None (peft's default)."""

    model_type: str
    modules: list[str] | str | None
    names: list[str]  # the layer names matched, for people; empty when peft decides (unknown architecture)
    multimodal: bool = False


def text_model_type(config: dict) -> tuple[str, bool]:
    """The language model's `model_type`, and whether the checkpoint is multimodal (a `text_config` inside)."""
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and text_config.get("model_type"):
        return text_config["model_type"], True
    return config.get("model_type") or "", False


def _scoped(names: list[str], multimodal: bool) -> list[str] | str:
    if not multimodal:
        return names
    return LANGUAGE_MODEL_SCOPE + "(" + "|".join(sorted(names)) + ")"


def resolve_targets(config: dict, target_modules: list[str] | str, *, param: str = "lora.target_modules") -> ResolvedTargets:
    """Resolve a preset or an explicit list against a model's config, or refuse with the names that exist."""
    model_type, multimodal = text_model_type(config)
    arch = ARCHITECTURES.get(model_type)
    known = f"{model_type}'s linear layers: {', '.join(arch.linear)}" if arch else ""
    if isinstance(target_modules, list):
        refused = [m for m in target_modules if m.split(".")[-1] in REFUSED_MODULES]
        if refused:
            raise InvalidRequest(
                f"target_modules names {', '.join(refused)}: serving engines (vLLM, TGI, LoRAX) refuse adapters that "
                f"train embeddings or the output head; choose among {known or 'the attention and MLP layers'}.",
                param=param, code="invalid_target_modules")
        if arch is not None:
            unknown = [m for m in target_modules if m.split(".")[-1] not in arch.linear]
            if unknown:
                raise InvalidRequest(
                    f"target_modules {', '.join(unknown)} match no layer of this model ({known}); or use a preset: "
                    "attention-qv, attention, all-linear.", param=param, code="invalid_target_modules")
        return ResolvedTargets(model_type, _scoped(list(target_modules), multimodal), list(target_modules), multimodal)
    if arch is None:
        if target_modules == "attention":
            raise InvalidRequest(
                f"The preset 'attention' is not known for model_type '{model_type or 'unknown'}'; use 'attention-qv' "
                "(peft's default for it), 'all-linear', or name the layers.", param=param,
                code="invalid_target_modules")
        return ResolvedTargets(model_type, "all-linear" if target_modules == "all-linear" else None, [], multimodal)
    names = list(getattr(arch, PRESET_ROLES[target_modules]))
    return ResolvedTargets(model_type, _scoped(names, multimodal), names, multimodal)


def holds_4bit(config: dict) -> bool:
    """Whether transformers can hold this architecture's base in 4 bits (unknown architectures are tried)."""
    arch = ARCHITECTURES.get(text_model_type(config)[0])
    return not (arch is not None and arch.no_4bit)


def check_quantization(config: dict, quantization: str) -> None:
    """Refuse 4-bit quantization for an architecture transformers cannot quantize (it would silently train in 16 bit)."""
    model_type, _ = text_model_type(config)
    if quantization not in ("none", "auto") and not holds_4bit(config):
        arch = ARCHITECTURES[model_type]
        raise InvalidRequest(f"quantization '{quantization}' is not possible for {model_type}: {arch.no_4bit}. Use "
                             "quantization 'none' (LoRA on the 16-bit base).", param="quantization",
                             code="quantization_unsupported")
