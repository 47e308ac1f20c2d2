"""Peak training memory of a LoRA/QLoRA job, by part, from the model's shape alone. Torch-free.

The model follows what the worker does (worker/training/model.py and pipeline.py): plain LoRA holds the base in
bf16 on a GPU (fp32 on the CPU) and trains under bf16 autocast; QLoRA quantizes every linear layer of the decoder
blocks to 4 bit and `prepare_model_for_kbit_training` casts everything else (embeddings, output head, norms,
biases, MoE experts) to fp32; adapters, their gradients and AdamW's states are fp32; a 4-bit job uses gradient
checkpointing and paged 8-bit AdamW on a GPU. docs/planning.md gives each formula with its evidence.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, computed_field

from core.planning.params import AdapterCounts, ModelShape

GIB = 1024**3

Device = Literal["cuda", "cpu"]
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]

# 4-bit storage per weight, in bytes: 4 bits, plus one absmax per block of 64 weights — fp32 (0.5 bit/weight),
# or, with double quantization, 8-bit absmax with one fp32 constant per 256 of them (0.127 bit): the QLoRA paper, §3.
NF4_BYTES = 4 / 8
ABSMAX_BYTES = 32 / 64 / 8
DOUBLE_QUANT_ABSMAX_BYTES = (8 / 64 + 32 / (64 * 256)) / 8

# AdamW keeps two states per trained parameter: fp32 (8 bytes), or 8-bit blockwise with an fp32 absmax per 256
# values (bitsandbytes); bitsandbytes keeps 32-bit states for tensors under 4,096 elements.
ADAM_32BIT_BYTES = 8
ADAM_8BIT_BYTES = 2 + 2 * 4 / 256
BNB_MIN_8BIT_SIZE = 4096

# The loss: the logits, their fp32 copy, log-softmax's saved output and the backward's two gradients at vocabulary
# size never coexist in full; the most that does is three fp32 tensors (12 bytes per token and vocabulary entry).
LOGITS_BYTES_PER_ENTRY = 12

# CUDA context, kernels and cuBLAS workspaces: present before the first tensor (measured by bench/gpu_check.py).
CUDA_RUNTIME_BYTES = int(0.6 * GIB)
# The Python process on the CPU: torch, transformers, the tokenizer, the data and the Trainer.
CPU_RUNTIME_BYTES = int(1.0 * GIB)
# The caching allocator's fragmentation on tensors that come and go every step.
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class TrainingSetup:
    """How one micro-batch is trained: device, precision, optimizer, checkpointing, and the tokens it holds."""

    device: Device
    quantization: Literal["nf4", "fp4", "none"]
    double_quant: bool
    optimizer: Optimizer
    gradient_checkpointing: bool
    tokens: int  # tokens in the largest micro-batch (all its rows)
    sequence: int  # the attention span: a packed row holds the whole micro-batch
    masked: bool  # an attention mask is built (several examples in a row, or padding): SDPA repeats k/v and keeps it
    lora_dropout: float
    compute_dtype_bytes: int = 2  # 4-bit layers' matmul dtype (bf16/fp16; 4 with compute_dtype float32)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def worker_optimizer(quantization: str, device: Device) -> Optimizer:
    """The optimizer the worker's Trainer uses (worker/training/pipeline.py: `training_arguments`): 8-bit paged
    states for QLoRA on a GPU, else torch's fused AdamW (one kernel for all the adapter's tensors, on the CPU too;
    the Trainer's own default since torch 2.8), the same states as the per-tensor loop."""
    return "paged_adamw_8bit" if quantization != "none" and device == "cuda" else "adamw_torch_fused"


class MemoryBreakdown(BaseModel):
    """Predicted peak memory of one training step, by part, in bytes."""

    quantized_weights: int = Field(description="4-bit linear layers with their quantization constants")
    full_precision_weights: int = Field(
        description="Base weights held in 16 or 32 bit: all of them for LoRA; for QLoRA the embeddings, output "
                    "head, norms, biases and MoE experts (fp32 after prepare_model_for_kbit_training)")
    adapter_weights: int = Field(description="LoRA A/B matrices (and DoRA magnitudes), fp32")
    gradients: int = Field(description="The adapter's gradients, fp32")
    optimizer_states: int = Field(description="AdamW's two states per adapter parameter (32- or 8-bit)")
    activations: int = Field(description="Tensors saved for the backward pass, and the backward's working set")
    logits: int = Field(description="Logits and loss at vocabulary size, the final norm, the head's 16-bit copy")
    overhead: int = Field(description="CUDA runtime (or the CPU process), fragmentation, 4-bit dequantization buffers")

    @computed_field(description="The sum: predicted peak memory of the device")
    @property
    def peak(self) -> int:
        return (self.quantized_weights + self.full_precision_weights + self.adapter_weights + self.gradients
                + self.optimizer_states + self.activations + self.logits + self.overhead)


def _weights(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(4-bit bytes, full-precision bytes) of the base model, vision tower included."""
    linear_weights = shape.layers * sum(linear.weights for linear in shape.linears)
    other = shape.base_parameters - linear_weights
    vision = shape.vision_parameters or 0
    if not setup.quantized:
        dtype_bytes = 2 if setup.device == "cuda" else 4
        return 0, (shape.base_parameters + vision) * dtype_bytes
    per_weight = NF4_BYTES + (DOUBLE_QUANT_ABSMAX_BYTES if setup.double_quant else ABSMAX_BYTES)
    return round((linear_weights + vision) * per_weight), other * 4


def _optimizer_bytes(adapter: AdapterCounts, shape: ModelShape, setup: TrainingSetup) -> int:
    if setup.optimizer in ("adamw_torch_fused", "adamw_torch", "paged_adamw_32bit"):
        return adapter.parameters * ADAM_32BIT_BYTES
    total = 0.0
    for linear in adapter.per_block:
        tensors = [adapter.rank * linear.in_features, adapter.rank * linear.out_features]
        if adapter.dora:
            tensors.append(linear.out_features)
        total += sum(n * (ADAM_8BIT_BYTES if n >= BNB_MIN_8BIT_SIZE else ADAM_32BIT_BYTES) for n in tensors)
    return round(total * shape.layers)


def block_activation_bytes(shape: ModelShape, adapter: AdapterCounts, setup: TrainingSetup) -> float:
    """Bytes one decoder block saves for the backward pass, per token."""
    gpu = setup.device == "cuda"
    compute = 2 if gpu else 4  # bf16 autocast on a GPU; fp32 on the CPU
    # a 4-bit layer returns its input's dtype, and prepare_model_for_kbit_training made the residual stream fp32
    linear_out = 4 if (setup.quantized or not gpu) else 2
    kv = shape.q_dim if setup.masked else shape.kv_dim  # with a mask, transformers repeats k/v for SDPA
    saved = shape.norms_per_block * 4 * shape.hidden  # norms upcast to fp32 and keep their input
    if shape.qk_norm:
        saved += 4 * (shape.q_dim + shape.kv_dim)
    saved += compute * (2 * shape.q_dim + 2 * kv) + 4 * shape.heads  # SDPA keeps q, k, v, output, logsumexp
    if setup.masked:
        saved += compute * setup.sequence  # the boolean mask, made an additive bias per call and kept
    mlp_tensors = 3 if shape.gated_mlp else 1  # act(gate), gate and up; or the activation's input
    saved += mlp_tensors * linear_out * shape.intermediate * max(1, shape.experts_per_token)
    if shape.experts:
        saved += 2 * linear_out * shape.hidden * shape.experts_per_token  # tokens gathered per expert
    dropout_mask = 1 if setup.lora_dropout > 0 else 0
    for linear in adapter.per_block:  # the adapter's input (cast for its matmul) and dropout mask, and A's output
        saved += (compute + dropout_mask) * linear.in_features + compute * adapter.rank
        if adapter.dora:
            saved += (linear_out + compute) * linear.out_features
    return saved


def _activations(shape: ModelShape, adapter: AdapterCounts, setup: TrainingSetup) -> int:
    block = block_activation_bytes(shape, adapter, setup) * setup.tokens
    shared_mask = setup.tokens * setup.sequence if setup.masked else 0
    expert_casts = 0
    if shape.experts and setup.quantized and setup.device == "cuda":
        expert_casts = shape.expert_parameters * 2  # fp32 experts cast to bf16 under autocast, kept for backward
    if setup.gradient_checkpointing:
        residual = 4 if (setup.quantized or setup.device == "cpu") else 2
        checkpoints = shape.layers * residual * shape.hidden * setup.tokens
        return round(checkpoints + 2 * (block + expert_casts) + shared_mask)  # one block recomputed, plus its grads
    return round((shape.layers + 1) * block + shape.layers * expert_casts + shared_mask)  # +1: backward's grads


def _logits(shape: ModelShape, setup: TrainingSetup) -> int:
    per_token = LOGITS_BYTES_PER_ENTRY * shape.vocab + 4 * shape.hidden
    if shape.logit_softcapping:
        per_token += 2 * 4 * shape.vocab
    head_copy = 2 * shape.vocab * shape.hidden if (setup.quantized and setup.device == "cuda") else 0
    return per_token * setup.tokens + head_copy


def _overhead(shape: ModelShape, adapter: AdapterCounts, setup: TrainingSetup, dynamic: int) -> int:
    runtime = CUDA_RUNTIME_BYTES if setup.device == "cuda" else CPU_RUNTIME_BYTES
    transient = 0
    if setup.quantized:  # a 4-bit weight is dequantized whole for each matmul, one at a time
        transient = max(linear.weights for linear in shape.linears) * setup.compute_dtype_bytes
    if adapter.dora and adapter.per_block:  # DoRA forms the merged weight to take its norm
        transient = max(transient, max(linear.weights for linear in adapter.per_block) * 8)
    return round(runtime + FRAGMENTATION * dynamic + transient)


def estimate_memory(shape: ModelShape, adapter: AdapterCounts, setup: TrainingSetup) -> MemoryBreakdown:
    """The predicted peak memory of training `shape` with `adapter` under `setup`, by part."""
    quantized, full = _weights(shape, setup)
    activations = _activations(shape, adapter, setup)
    logits = _logits(shape, setup)
    return MemoryBreakdown(
        quantized_weights=quantized,
        full_precision_weights=full,
        adapter_weights=adapter.parameters * 4,
        gradients=adapter.parameters * 4,
        optimizer_states=_optimizer_bytes(adapter, shape, setup),
        activations=activations,
        logits=logits,
        overhead=_overhead(shape, adapter, setup, activations + logits),
    )
