"""Exact parameter counts from a model's `config.json`, per `model_type`, as PEFT counts them. Torch-free.

Each supported family is described by the layers one decoder block holds (linear layers by their module path,
with their shapes and biases) plus the parameters around them (norms, embeddings, output head, MoE experts).
The shapes follow the transformers 5.24 modeling code, including its config classes' defaults for keys a
`config.json` may leave out; `tests/core/test_planning.py` checks every family against PEFT's own count on a
meta-device model. docs/planning.md states the rule.
"""

from dataclasses import dataclass, field, replace

from core.architectures import resolve_targets, text_model_type
from core.spec import LoraSpec


class UnsupportedModel(Exception):
    """The planner has no exact description of this architecture: counts stay unknown rather than guessed."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its module path inside the block, and its shape."""

    path: str  # e.g. "self_attn.q_proj"; peft matches a target name against its end
    in_features: int
    out_features: int
    bias: bool

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def parameters(self) -> int:
        return self.weights + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a causal language model, read from its config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    linears: tuple[Linear, ...]  # per decoder block
    block_other: int  # per block: norm weights and biases, MoE router and experts (not nn.Linear)
    embeddings: int  # token (and learned position) embeddings
    head: int  # output projection; 0 when tied to the embeddings
    final_norm: int
    norms_per_block: int  # hidden-size norms in a block, for activation memory
    qk_norm: bool = False  # per-head norms on queries and keys (Qwen3, Gemma 3)
    gated_mlp: bool = True  # act(gate) * up: three intermediate-size tensors instead of one
    experts: int = 0  # MoE experts per block (fused 3-D weights in transformers 5: never quantized)
    experts_per_token: int = 0
    expert_parameters: int = 0  # per block, all experts together (part of block_other)
    logit_softcapping: bool = False
    multimodal: bool = False
    vision_parameters: int | None = None  # an estimate, outside every exact count
    notes: tuple[str, ...] = field(default=())

    @property
    def base_parameters(self) -> int:
        """All parameters of the language model, tied ones once (as `named_parameters` yields them)."""
        block = sum(linear.parameters for linear in self.linears) + self.block_other
        return self.layers * block + self.embeddings + self.head + self.final_norm

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _value(config: dict, key: str, default):
    """`config[key]`, or the config class's default when the key is absent (a null stays null)."""
    return config[key] if key in config else default


def _heads(config: dict, kv_default: int | None) -> tuple[int, int]:
    heads = config.get("num_attention_heads", 32)
    kv = _value(config, "num_key_value_heads", kv_default)
    return heads, heads if kv is None else kv


def _head_dim(config: dict, hidden: int, heads: int, default: int | None = None) -> int:
    return _value(config, "head_dim", default) or hidden // heads


def _separate_qkvo(hidden: int, q_dim: int, kv_dim: int, qkv_bias: bool, o_bias: bool) -> tuple[Linear, ...]:
    """The q, k, v and o projections as separate layers (`self_attn.*_proj`)."""
    return (
        Linear("self_attn.q_proj", hidden, q_dim, qkv_bias),
        Linear("self_attn.k_proj", hidden, kv_dim, qkv_bias),
        Linear("self_attn.v_proj", hidden, kv_dim, qkv_bias),
        Linear("self_attn.o_proj", q_dim, hidden, o_bias),
    )


def _llama_like(config: dict, model_type: str, *, kv_default: int | None, head_dim_default: int | None = None,
                qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False, norms_per_block: int = 2,
                qk_norm: bool = False, tie_default: bool = False) -> ModelShape:
    """Llama and its descendants: separate q/k/v/o projections, a gated MLP, RMSNorm without bias."""
    hidden = config.get("hidden_size", 4096)
    heads, kv = _heads(config, kv_default)
    head_dim = _head_dim(config, hidden, heads, head_dim_default)
    intermediate = config.get("intermediate_size", 11008)
    q_dim, kv_dim = heads * head_dim, kv * head_dim
    linears = _separate_qkvo(hidden, q_dim, kv_dim, qkv_bias, o_bias) + (
        Linear("mlp.gate_proj", hidden, intermediate, mlp_bias),
        Linear("mlp.up_proj", hidden, intermediate, mlp_bias),
        Linear("mlp.down_proj", intermediate, hidden, mlp_bias),
    )
    vocab = config.get("vocab_size", 32000)
    tied = bool(_value(config, "tie_word_embeddings", tie_default))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=config.get("num_hidden_layers", 32), heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, linears=linears,
        block_other=norms_per_block * hidden + (2 * head_dim if qk_norm else 0),
        embeddings=vocab * hidden, head=0 if tied else vocab * hidden, final_norm=hidden,
        norms_per_block=norms_per_block, qk_norm=qk_norm,
        logit_softcapping=bool(config.get("final_logit_softcapping")),
    )


def _llama(config: dict, model_type: str) -> ModelShape:
    attention_bias = bool(config.get("attention_bias", False))
    return _llama_like(config, model_type, kv_default=None, qkv_bias=attention_bias, o_bias=attention_bias,
                       mlp_bias=bool(config.get("mlp_bias", False)))


def _mistral(config: dict, model_type: str) -> ModelShape:
    return _llama_like(config, model_type, kv_default=8)


def _qwen2(config: dict, model_type: str) -> ModelShape:
    return _llama_like(config, model_type, kv_default=32, qkv_bias=True)


def _qwen3(config: dict, model_type: str) -> ModelShape:
    attention_bias = bool(config.get("attention_bias", False))
    return _llama_like(config, model_type, kv_default=32, head_dim_default=128, qkv_bias=attention_bias,
                       o_bias=attention_bias, qk_norm=True)


def _gemma(config: dict, model_type: str) -> ModelShape:
    kv_default, norms = (16, 2) if model_type == "gemma" else (4, 4)
    attention_bias = bool(config.get("attention_bias", False))
    return _llama_like(config, model_type, kv_default=kv_default, head_dim_default=256, qkv_bias=attention_bias,
                       o_bias=attention_bias, norms_per_block=norms, qk_norm=model_type == "gemma3_text",
                       tie_default=True)


def _mixtral(config: dict, model_type: str) -> ModelShape:
    """Mixtral: Llama attention; the experts are fused 3-D parameters and the router a bare weight (transformers 5)."""
    shape = _llama_like(config, model_type, kv_default=8)
    experts = _value(config, "num_local_experts", None) or config.get("num_experts") or 8
    expert_parameters = experts * 3 * shape.hidden * shape.intermediate
    router = experts * shape.hidden
    return replace(
        shape, linears=shape.linears[:4], block_other=shape.block_other + router + expert_parameters,
        experts=experts, experts_per_token=config.get("num_experts_per_tok", 2), expert_parameters=expert_parameters,
        notes=("the experts are fused 3-D weights in transformers 5: LoRA cannot target them and bitsandbytes "
               "does not quantize them (with QLoRA they are held in fp32)",),
    )


def _phi3(config: dict, model_type: str) -> ModelShape:
    hidden = config.get("hidden_size", 3072)
    heads, kv = _heads(config, None)
    head_dim = _head_dim(config, hidden, heads)
    intermediate = config.get("intermediate_size", 8192)
    vocab = config.get("vocab_size", 32064)
    q_dim = heads * head_dim
    linears = (
        Linear("self_attn.qkv_proj", hidden, q_dim + 2 * kv * head_dim, False),
        Linear("self_attn.o_proj", q_dim, hidden, False),
        Linear("mlp.gate_up_proj", hidden, 2 * intermediate, False),
        Linear("mlp.down_proj", intermediate, hidden, False),
    )
    tied = bool(_value(config, "tie_word_embeddings", False))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=config.get("num_hidden_layers", 32), heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, linears=linears, block_other=2 * hidden,
        embeddings=vocab * hidden, head=0 if tied else vocab * hidden, final_norm=hidden, norms_per_block=2,
    )


def _starcoder2(config: dict, model_type: str) -> ModelShape:
    hidden = config.get("hidden_size", 3072)
    heads, kv = _heads(config, 2)
    head_dim = _head_dim(config, hidden, heads)
    intermediate = config.get("intermediate_size", 12288)
    bias = bool(_value(config, "use_bias", True))
    vocab = config.get("vocab_size", 49152)
    q_dim, kv_dim = heads * head_dim, kv * head_dim
    linears = _separate_qkvo(hidden, q_dim, kv_dim, bias, bias) + (
        Linear("mlp.c_fc", hidden, intermediate, bias),
        Linear("mlp.c_proj", intermediate, hidden, bias),
    )
    tied = bool(_value(config, "tie_word_embeddings", True))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=config.get("num_hidden_layers", 30), heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, linears=linears,
        block_other=2 * 2 * hidden,  # two LayerNorms with bias
        embeddings=vocab * hidden, head=0 if tied else vocab * hidden, final_norm=2 * hidden, norms_per_block=2,
        gated_mlp=False,
    )


def _gpt_neox(config: dict, model_type: str) -> ModelShape:
    hidden = config.get("hidden_size", 6144)
    heads = config.get("num_attention_heads", 64)
    intermediate = config.get("intermediate_size", 24576)
    bias = bool(_value(config, "attention_bias", True))
    vocab = config.get("vocab_size", 50432)
    linears = (
        Linear("attention.query_key_value", hidden, 3 * hidden, bias),
        Linear("attention.dense", hidden, hidden, bias),
        Linear("mlp.dense_h_to_4h", hidden, intermediate, True),
        Linear("mlp.dense_4h_to_h", intermediate, hidden, True),
    )
    tied = bool(_value(config, "tie_word_embeddings", False))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=config.get("num_hidden_layers", 44), heads=heads, kv_heads=heads,
        head_dim=hidden // heads, intermediate=intermediate, vocab=vocab, linears=linears, block_other=2 * 2 * hidden,
        embeddings=vocab * hidden, head=0 if tied else vocab * hidden, final_norm=2 * hidden, norms_per_block=2,
        gated_mlp=False,
    )


def _falcon(config: dict, model_type: str) -> ModelShape:
    """Falcon: one fused query_key_value whose width depends on the layout (7B multi-query, 40B/180B new decoder)."""
    hidden = config.get("hidden_size") or config.get("n_embed") or 4544
    heads = config.get("num_attention_heads", 71)
    kv = _value(config, "num_kv_heads", None) or heads
    head_dim = hidden // heads
    new_decoder = bool(config.get("new_decoder_architecture", False))
    multi_query = bool(_value(config, "multi_query", True))
    parallel = bool(_value(config, "parallel_attn", True))
    bias = bool(config.get("bias", False))
    if new_decoder:
        qkv_out, kv_heads = (2 * kv + heads) * head_dim, kv
    elif multi_query:
        qkv_out, kv_heads = hidden + 2 * head_dim, 1
    else:
        qkv_out, kv_heads = 3 * hidden, heads
    ln_parallel = config.get("num_ln_in_parallel_attn") or (2 if new_decoder else None)
    norms = 2 if (not parallel or ln_parallel == 2) else 1
    intermediate = config.get("ffn_hidden_size") or 4 * hidden
    vocab = config.get("vocab_size", 65024)
    linears = (
        Linear("self_attention.query_key_value", hidden, qkv_out, bias),
        Linear("self_attention.dense", hidden, hidden, bias),
        Linear("mlp.dense_h_to_4h", hidden, intermediate, bias),
        Linear("mlp.dense_4h_to_h", intermediate, hidden, bias),
    )
    tied = bool(_value(config, "tie_word_embeddings", True))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=config.get("num_hidden_layers", 32), heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate, vocab=vocab, linears=linears,
        block_other=norms * 2 * hidden, embeddings=vocab * hidden, head=0 if tied else vocab * hidden,
        final_norm=2 * hidden, norms_per_block=norms, gated_mlp=False,
    )


def _gpt2(config: dict, model_type: str) -> ModelShape:
    if config.get("add_cross_attention"):
        raise UnsupportedModel("GPT-2 with cross-attention is an encoder-decoder layout the planner does not count")
    hidden = config.get("n_embd") or config.get("hidden_size") or 768
    heads = config.get("n_head") or config.get("num_attention_heads") or 12
    layers = config.get("n_layer") or config.get("num_hidden_layers") or 12
    positions = config.get("n_positions") or config.get("max_position_embeddings") or 1024
    intermediate = config.get("n_inner") or 4 * hidden
    vocab = config.get("vocab_size", 50257)
    linears = (  # Conv1D layers: the same counts as nn.Linear, weights stored transposed
        Linear("attn.c_attn", hidden, 3 * hidden, True),
        Linear("attn.c_proj", hidden, hidden, True),
        Linear("mlp.c_fc", hidden, intermediate, True),
        Linear("mlp.c_proj", intermediate, hidden, True),
    )
    tied = bool(_value(config, "tie_word_embeddings", True))
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        intermediate=intermediate, vocab=vocab, linears=linears, block_other=2 * 2 * hidden,
        embeddings=(vocab + positions) * hidden, head=0 if tied else vocab * hidden, final_norm=2 * hidden,
        norms_per_block=2, gated_mlp=False,
    )


FAMILIES = {
    "llama": _llama, "mistral": _mistral, "mixtral": _mixtral, "qwen2": _qwen2, "qwen3": _qwen3,
    "gemma": _gemma, "gemma2": _gemma, "gemma3_text": _gemma, "falcon": _falcon, "gpt_neox": _gpt_neox,
    "phi3": _phi3, "gpt2": _gpt2, "starcoder2": _starcoder2,
}


def _vision_estimate(vision: dict, text_hidden: int) -> int | None:
    """A ViT (SigLIP/CLIP-like) tower and a one-matrix projector, from the vision config's sizes: an estimate."""
    hidden, layers, intermediate = (vision.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size"))
    if not (hidden and layers and intermediate):
        return None
    patch, image, channels = vision.get("patch_size", 14), vision.get("image_size", 224), vision.get("num_channels", 3)
    block = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 2 * 2 * hidden
    embeddings = channels * patch * patch * hidden + hidden + (image // patch) ** 2 * hidden
    return layers * block + embeddings + 2 * hidden + hidden * text_hidden + hidden


def model_shape(config: dict) -> ModelShape:
    """The language model's shape from a `config.json` dict; `UnsupportedModel` when it is not modelled exactly."""
    model_type, multimodal = text_model_type(config)
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModel(f"model_type '{model_type or 'missing'}' is not modelled by the planner (known: {known})")
    text_config = config["text_config"] if multimodal else config
    shape = family(text_config, model_type)
    if not multimodal:
        return shape
    vision = config.get("vision_config")
    estimate = _vision_estimate(vision, shape.hidden) if isinstance(vision, dict) else None
    note = ("multimodal checkpoint: counts cover the language model only; the vision tower "
            + (f"(about {estimate / 1e6:,.0f} M parameters, estimated) is loaded but not counted"
               if estimate else "is loaded but not counted nor estimated"))
    return replace(shape, multimodal=True, vision_parameters=estimate, notes=shape.notes + (note,))


@dataclass(frozen=True)
class AdapterCounts:
    """The LoRA (and DoRA) parameters one adapter adds."""

    parameters: int
    modules: int  # adapted linear layers in the whole model
    per_block: tuple[Linear, ...]  # the adapted layers of one block
    names: tuple[str, ...]
    rank: int
    dora: bool

    def lora_weights(self, linear: Linear) -> int:
        """LoRA's A (r × in) and B (out × r) on one layer."""
        return self.rank * (linear.in_features + linear.out_features)


def _targeted(linear: Linear, names: list[str]) -> bool:
    return any(linear.path == name or linear.path.endswith("." + name) for name in names)


def adapter_counts(shape: ModelShape, config: dict, lora: LoraSpec) -> AdapterCounts:
    """LoRA's A (r × in) and B (out × r) per adapted layer, plus DoRA's magnitude vector (out); rsLoRA adds none."""
    names = resolve_targets(config, lora.target_modules).names
    adapted = tuple(linear for linear in shape.linears if _targeted(linear, names))
    per_layer = sum(lora.r * (linear.in_features + linear.out_features)
                    + (linear.out_features if lora.use_dora else 0) for linear in adapted)
    return AdapterCounts(shape.layers * per_layer, shape.layers * len(adapted), adapted, tuple(names), lora.r,
                         lora.use_dora)
