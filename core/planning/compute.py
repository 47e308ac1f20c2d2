"""Training FLOPs per token, and the GPU classes jobs are planned for. Torch-free."""

import os

from pydantic import BaseModel, Field

from core.planning.params import AdapterCounts, ModelShape

# Model FLOPs utilisation assumed for a 16-bit LoRA step with the Trainer and SDPA (bench/gpu_check.py measures it);
# 4-bit layers dequantize their weights for every matmul, which costs throughput on top of that.
GPU_UTILISATION = 0.30
QUANTIZED_SPEED = {"cuda": 0.65, "cpu": 0.85}  # CPU: 132 vs 158 tokens/s for SmolLM2 (DESIGN.md, 3 rounds)
# On this kind of 2-core machine SmolLM2 LoRA trained 100-158 tokens/s, about 0.06 effective TFLOPS (DESIGN.md).
CPU_TFLOPS_PER_CORE = 0.16
CPU_UTILISATION = 0.20
# Greedy generation (general replay's answers, before training) computes one token a row each step. On the CPU it
# ran at about a third of training's utilisation (SmolLM2-135M, 36 prompts of 128 new tokens at most in 75 s on a
# 2-core EPYC in float32); on a GPU a step of a few rows is bound by reading the weights (`memory_bandwidth_gbs`).
GENERATION_SHARE = 0.3


class GpuClass(BaseModel):
    """A class of machines a job can be routed to: its memory and its speed."""

    name: str = Field(description="Queue name, e.g. gpu-24g; `cpu` for the embedded default")
    memory_gib: float = Field(gt=0, description="Device memory as the driver reports it (RAM for the CPU), GiB")
    tflops: float = Field(gt=0, description="Dense bf16 tensor peak of one GPU (fp32 peak of the CPU), TFLOPS")
    device: str = Field("cuda", pattern="^(cuda|cpu)$", description="`cuda` or `cpu`")
    utilisation: float = Field(GPU_UTILISATION, gt=0, le=1, description="Model FLOPs utilisation assumed")
    memory_bandwidth_gbs: float | None = Field(
        None, gt=0, description="Memory bandwidth, GB/s: bounds generation (general replay's answers); none for the CPU")
    description: str = ""


def _machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def cpu_class(memory_gib: float | None = None) -> GpuClass:
    """This machine's CPU as a class: its RAM, and the throughput measured on a 2-core machine scaled by cores."""
    cores = os.cpu_count() or 1
    return GpuClass(name="cpu", memory_gib=round(memory_gib or _machine_memory_gib(), 1),
                    tflops=CPU_TFLOPS_PER_CORE * cores, device="cpu", utilisation=CPU_UTILISATION,
                    description=f"this machine's {cores} CPU cores and RAM (the embedded default)")


# The smallest memory and the lowest speed of each class's usual cards, so that a plan errs on the safe side.
GPU_CLASSES = {
    "gpu-24g": GpuClass(name="gpu-24g", memory_gib=22.5, tflops=121, memory_bandwidth_gbs=300,
                        description="L4 / A10 / RTX 4090 (L4: 22.5 GiB, 121 TFLOPS, 300 GB/s)"),
    "gpu-48g": GpuClass(name="gpu-48g", memory_gib=45.0, tflops=155, memory_bandwidth_gbs=768,
                        description="L40S / RTX A6000 (L40S: 45.0 GiB; A6000: 155 TFLOPS, 768 GB/s)"),
    "gpu-80g": GpuClass(name="gpu-80g", memory_gib=79.6, tflops=312, memory_bandwidth_gbs=1935,
                        description="A100 / H100 80GB (H100: 79.6 GiB; A100: 312 TFLOPS, 1,935 GB/s)"),
    "gpu-141g": GpuClass(name="gpu-141g", memory_gib=140.0, tflops=989, memory_bandwidth_gbs=4800,
                         description="H200 (140 GiB, 989 TFLOPS, 4,800 GB/s)"),
}


def default_gpu_classes() -> list[GpuClass]:
    """The four GPU classes, and this machine's CPU."""
    return [*GPU_CLASSES.values(), cpu_class()]


def parse_gpu_classes(text: str) -> list[GpuClass]:
    """Classes from `NAME[:MEMORY_GIB[:TFLOPS]]` items, comma-separated: `gpu-24g,gpu-80g:80:989,cpu:64`.

    A known name alone takes its defaults; `cpu` alone is this machine; any other name needs its memory.
    """
    classes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *numbers = (piece.strip() for piece in item.split(":"))
        if len(numbers) > 2:
            raise ValueError(f"'{item}': expected NAME[:MEMORY_GIB[:TFLOPS]]")
        try:
            values = [float(n) for n in numbers]
        except ValueError:
            raise ValueError(f"'{item}': memory and TFLOPS must be numbers") from None
        if name == "cpu":
            base = cpu_class(values[0] if values else None)
        elif name in GPU_CLASSES:
            base = GPU_CLASSES[name]
        elif values:
            smallest = GPU_CLASSES["gpu-24g"]
            base = GpuClass(name=name, memory_gib=values[0], tflops=smallest.tflops,
                            memory_bandwidth_gbs=smallest.memory_bandwidth_gbs, description="configured")
        else:
            raise ValueError(f"'{name}' is not a known class ({', '.join(GPU_CLASSES)}, cpu): give NAME:MEMORY_GIB")
        update = dict(zip(("memory_gib", "tflops"), values))
        classes.append(GpuClass.model_validate({**base.model_dump(), **update}))
    if len({c.name for c in classes}) != len(classes):
        raise ValueError("a class is named twice")
    return classes


def flops_per_token(shape: ModelShape, adapter: AdapterCounts, *, sequence: float, masked: bool,
                    gradient_checkpointing: bool) -> tuple[float, float]:
    """(FLOPs a training step spends per token, the model's share of them: without checkpointing's recompute).

    Frozen base: the backward computes input gradients only (2 FLOPs per weight), the adapter its weight
    gradients too. Attention costs 4·d·span per token forward, twice that backward; with a mask the kernel cannot
    skip the causal half, so the span is the whole row.
    """
    block_matmul = _block_matmul(shape)
    adapter_weights = sum(adapter.lora_weights(linear) for linear in adapter.per_block)
    span = sequence if masked else sequence / 2
    attention = 4 * shape.q_dim * span
    block_forward = 2 * (block_matmul + adapter_weights) + attention
    block_backward = 2 * block_matmul + 4 * adapter_weights + 2 * attention
    head = 2 * shape.vocab * shape.hidden
    model = shape.layers * (block_forward + block_backward) + 2 * head
    return model + (shape.layers * block_forward if gradient_checkpointing else 0), model


def _block_matmul(shape: ModelShape) -> int:
    """Weights a token multiplies in one block: every linear layer, and the experts it is routed to."""
    block_matmul = sum(linear.weights for linear in shape.linears)
    if shape.experts:
        block_matmul += shape.expert_parameters * shape.experts_per_token // shape.experts
    return block_matmul


def forward_flops_per_token(shape: ModelShape) -> float:
    """FLOPs of one generated token: the blocks' and the head's matmuls, forward only (a short answer's attention
    over its cached keys is small beside them)."""
    return shape.layers * 2 * _block_matmul(shape) + 2 * shape.vocab * shape.hidden
