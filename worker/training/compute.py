"""The compute path a job trains with, chosen by measuring this machine rather than by a rule about it.

Whether bf16 pays on a CPU depends on the chip: with AVX512-BF16 or AMX it runs in hardware, on an AVX2-only CPU it
is emulated, and by how much differs per kind of layer (bitsandbytes' 4-bit layers ran 43x slower in bf16 than in
fp32 on an AVX2 EPYC, while a plain bf16 matmul there is not far from fp32). So a worker times, once per process,
the layers training actually runs, forward and backward, in each candidate dtype, and takes the fastest:

- plain LoRA: a frozen `nn.Linear` in fp32, under bf16 autocast (fp32 weights, Trainer `bf16=True`), and in bf16
  weights (the base loaded in bf16);
- QLoRA: a bitsandbytes NF4 `Linear4bit` with fp32 and with bf16 compute.

fp32 is kept unless another candidate is at least `MIN_GAIN` faster: it is the more precise, and a near tie must
not flip between workers. On a GPU the rule stands (bf16 where the card supports it, else fp16): tensor cores
compute both many times faster than fp32, which needs no probe. The choice and its timings go into the job's
events and the model card (`ComputePath.description`).
"""

import functools
import time
from dataclasses import dataclass, field

MIN_GAIN = 1.2  # a bf16 candidate must beat fp32 by this factor to be chosen
PROBE_FEATURES = 1024  # a layer of this width (SmolLM2's is 576, a 7B's 4096)
PROBE_TOKENS = 256
PROBE_REPEATS = 5

ATTENTION_LENGTHS = (64, 128, 256, 512, 1024)  # example lengths the attention probe times, up to the spec's limit

PLAIN_CANDIDATES = ("float32", "bf16-autocast", "bfloat16")
QUANTIZED_CANDIDATES = ("float32", "bfloat16")
ATTENTION_CANDIDATES = ("float32", "bfloat16")  # bf16 inputs, attended as they are or through float32


@dataclass(frozen=True)
class ComputePath:
    """How one kind of job computes on this device, and why."""

    device: str
    quantized: bool
    choice: str  # plain: float32 | bf16-autocast | bfloat16 | float16; 4-bit: the matmul dtype
    how: str  # "measured" | "rule" | "spec" | "setting"
    seconds: dict[str, float] = field(default_factory=dict)  # candidate -> best time of the probe

    @property
    def cpu_base_dtype(self) -> str:
        """On the CPU, the dtype the base loads in: bf16 only where plain LoRA measured fastest in bf16 weights."""
        return "bfloat16" if self.choice == "bfloat16" and not self.quantized else "float32"

    @property
    def autocast_bf16(self) -> bool:
        return self.choice == "bf16-autocast"

    def description(self) -> str:
        what = f"matmuls of the 4-bit layers in {self.choice}" if self.quantized else {
            "float32": "base and compute in float32", "bf16-autocast": "base in float32, bf16 autocast",
        }.get(self.choice, f"base and compute in {self.choice}")
        if self.how == "measured":
            timings = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in self.seconds.items())
            return f"{what} (measured on this {self.device}: {timings} per probe step)"
        if self.how == "spec":
            return f"{what} (as the spec asks)"
        if self.how == "setting":
            return f"{what} (as LORAJOBS_CPU_COMPUTE asks)"
        return f"{what} (rule for {self.device}: {'bf16' if 'bfloat16' in self.choice else 'fp16'} where supported)"


def choose(seconds: dict[str, float]) -> str:
    """The fastest candidate, but float32 unless the winner beats it by MIN_GAIN."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] * MIN_GAIN <= seconds["float32"] else "float32"


def _best_times(steps: dict, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Each candidate's best time over `repeats` rounds. The candidates take turns within a round, in an order that
    rotates, so a burst of load from another process slows every candidate alike instead of the one whose block it
    fell in: timed one block after another, two workers probing side by side on a 2-core EPYC chose differently
    (bf16 autocast 7.2 ms against bf16 weights 11.5 ms in one, 7.6 against 6.3 in the other)."""
    names = list(steps)
    for step in steps.values():
        step()  # warm-up: first-call dispatch, allocations, weight layout
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(times[name]) for name in names}


def _plain_step(candidate: str):
    import torch

    dtype = torch.bfloat16 if candidate == "bfloat16" else torch.float32
    layer = torch.nn.Linear(PROBE_FEATURES, PROBE_FEATURES, bias=False).to(dtype).requires_grad_(False)
    x = torch.randn(PROBE_TOKENS, PROBE_FEATURES, dtype=dtype, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=candidate == "bf16-autocast"):
            out = layer(x)
        out.float().sum().backward()

    return step


def _quantized_step(candidate: str):
    import bitsandbytes as bnb
    import torch

    dtype = getattr(torch, candidate)
    layer = bnb.nn.Linear4bit(PROBE_FEATURES, PROBE_FEATURES, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes the weight
    layer.requires_grad_(False)
    x = torch.randn(PROBE_TOKENS, PROBE_FEATURES, dtype=dtype, requires_grad=True)

    def step():
        layer(x).float().sum().backward()  # with grad, as in training: no inference repacking

    return step


@functools.cache
def measured_cpu_path(quantized: bool) -> ComputePath:
    """Time each candidate on this CPU (about a second, once per process) and choose."""
    import torch

    candidates, make = (QUANTIZED_CANDIDATES, _quantized_step) if quantized else (PLAIN_CANDIDATES, _plain_step)
    with torch.random.fork_rng():  # the probe's random inputs must not move the job's seeded stream
        seconds = _best_times({name: make(name) for name in candidates})
    return ComputePath("cpu", quantized, choose(seconds), "measured", seconds)


@dataclass(frozen=True)
class AttentionPath:
    """Where a bf16 model on the CPU attends in float32 instead: in examples shorter than `fp32_below` tokens.

    PyTorch's CPU flash-attention kernel ran a short example's causal attention, forward and backward, about 3x
    slower in bf16 than in float32 on an AVX512-BF16 EPYC (80 tokens: 1.65 ms against 0.58, casts included), while
    at 1,000 tokens bf16 was 1.3x faster: per-example attention over packed rows of short examples spent a quarter
    of a SmolLM2 step there. So this is measured per length, like the layers' dtype, and float32 (the more precise)
    is kept at a length unless bf16 beats it by `MIN_GAIN`."""

    fp32_below: int  # 0: every example attends in bf16
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # length -> candidate -> best time

    def description(self) -> str:
        probed = max(self.seconds) if self.seconds else 0
        where = ("no example" if self.fp32_below == 0 else "every example" if self.fp32_below > probed
                 else f"examples under {self.fp32_below} tokens")
        timings = "; ".join(f"{length} tokens: float32 {1000 * s['float32']:.2f} ms, bfloat16 {1000 * s['bfloat16']:.2f} ms"
                            for length, s in sorted(self.seconds.items()))
        return f"attention in float32 for {where} (measured per example: {timings})"


def _attention_step(candidate: str, length: int, heads: int, kv_heads: int, head_dim: int):
    import torch

    shape = (1, heads, length, head_dim), (1, kv_heads, length, head_dim), (1, kv_heads, length, head_dim)
    q, k, v = (torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in shape)

    def step():
        inputs = (q.float(), k.float(), v.float()) if candidate == "float32" else (q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=kv_heads != heads)
        out.to(torch.bfloat16).float().sum().backward()

    return step


@functools.cache
def measured_attention_path(heads: int, kv_heads: int, head_dim: int, max_length: int) -> AttentionPath:
    """Time one example's causal attention, forward and backward, in bf16 and through float32 at each probed length up
    to `max_length` (well under a second for SmolLM2's heads); float32 below the first length where bf16 wins."""
    import torch

    lengths = [n for n in ATTENTION_LENGTHS if n <= max_length] or [ATTENTION_LENGTHS[0]]
    seconds = {}
    with torch.random.fork_rng():
        for length in lengths:
            seconds[length] = _best_times({name: _attention_step(name, length, heads, kv_heads, head_dim)
                                           for name in ATTENTION_CANDIDATES})
    bf16_from = next((n for n in lengths if choose(seconds[n]) == "bfloat16"), None)
    if bf16_from is None:  # float32 at every probed length: every example
        return AttentionPath(max_length + 1, seconds)
    return AttentionPath(0 if bf16_from == lengths[0] else bf16_from, seconds)


def attention_path(spec, device: str, config) -> AttentionPath | None:
    """The attention path of a plain LoRA job whose base computes in bf16 on this CPU (bf16 weights or autocast);
    None where attention is not in bf16 there (float32, 4-bit layers over a float32 base) or on a GPU."""
    if device != "cpu" or spec.quantization != "none" or compute_path(spec, device).choice == "float32":
        return None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return measured_attention_path(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                                   spec.max_seq_length)


def compute_path(spec, device: str) -> ComputePath:
    """The compute path for `spec` on `device`: the spec's own 4-bit dtype, a GPU's rule, or this CPU measured."""
    quantized = spec.quantization != "none"
    if quantized and spec.compute_dtype != "auto":
        return ComputePath(device, True, spec.compute_dtype, "spec")
    if device == "cuda":
        import torch

        return ComputePath(device, quantized, "bfloat16" if torch.cuda.is_bf16_supported() else "float16", "rule")
    from core.settings import get_settings

    forced = get_settings().cpu_compute
    if forced != "auto":
        choice = ("bfloat16" if forced != "float32" else "float32") if quantized else forced
        return ComputePath(device, quantized, choice, "setting")
    return measured_cpu_path(quantized)
