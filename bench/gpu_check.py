"""GPU check of the planner: predicted vs measured peak memory, real tokens/s and model FLOPs utilisation.

For random-weight models of real shapes (Llama-2-7B and a 13B, bf16) it trains a few steps the way the worker
does — QLoRA: NF4 with double quantization, prepare_model_for_kbit_training, gradient checkpointing, paged 8-bit
AdamW; qlora-kept: the same with activations kept (the plan's choice wherever they fit); LoRA: bf16 base, torch
AdamW, no checkpointing; bf16 autocast, SDPA, r=16 on q/v — at one example of 512
and of 2048 tokens and at four packed examples of 512, and prints what core/planning predicts next to what the
device shows. Goal: measured peak within 15 % of predicted. No weights are downloaded: the models are random.
Each model and mode runs in its own process, so that one's paged buffers and cached blocks do not count in the next.

    python bench/gpu_check.py                                   # about 5 min on one H200
    python bench/gpu_check.py --models 7b --modes qlora --steps 2
    python bench/gpu_check.py --smoke                           # a tiny model on the CPU: the code path only

The GPU machine needs torch and transformers; bitsandbytes, peft, accelerate and psutil come from `--pkgs DIR`
(made beforehand on a machine that has them: `--prepare-pkgs DIR`), else installed with pip. Without a CUDA GPU
it exits at once with status 2. docs/benchmarks.md says how to run it; docs/planning.md what it checks.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
SHAPES = {
    "7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
}
CASES = ((1, 512), (4, 512), (1, 2048))  # (examples packed in the micro-batch, tokens per example)
SMOKE_CASES = ((1, 64), (2, 64))
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A6000": 155, "L4": 121, "A10": 125}
NEEDED = ("bitsandbytes", "peft", "accelerate", "psutil")  # psutil: abi3 wheels, any CPython 3
TOLERANCE = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="7b,13b", help="Comma-separated: 7b, 13b.")
    parser.add_argument("--modes", default="qlora,qlora-kept,lora", help="Comma-separated: qlora, qlora-kept, lora.")
    parser.add_argument("--steps", type=int, default=3, help="Measured steps per case, after one warm-up step.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="The GPU's dense bf16 peak (else by name).")
    parser.add_argument("--pkgs", type=Path, default=ROOT / "bench" / "output" / "pkgs",
                        help="Folder of vendored bitsandbytes/peft/accelerate/psutil, put first on sys.path.")
    parser.add_argument("--prepare-pkgs", type=Path, default=None, metavar="DIR",
                        help="Copy this environment's bitsandbytes/peft/accelerate/psutil into DIR for a GPU machine.")
    parser.add_argument("--cuda", default="128,130",
                        help="With --prepare-pkgs: CUDA versions of bitsandbytes' libraries to keep (torch.version.cuda "
                             "without the dot).")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here (default: $OUT or bench/output).")
    parser.add_argument("--smoke", action="store_true", help="A tiny model on the CPU: checks the code path, not memory.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 1
    return args


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


def require_cuda() -> None:
    """Exit with status 2 and a clear message unless torch sees a CUDA GPU: nothing here makes sense on a CPU."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed; this check needs torch with CUDA on a GPU machine.")
    if not torch.cuda.is_available():
        fail(f"no CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU. "
             "Run it on a GPU machine (docs/benchmarks.md, 'GPU check of the planner'), or --smoke on a CPU.")


def prepare_pkgs(dest: Path, cuda_versions: list[str]) -> None:
    """Copy bitsandbytes (only the CUDA libraries asked for), peft, accelerate and psutil for a machine without them."""
    import importlib.util

    dest.mkdir(parents=True, exist_ok=True)
    for name in NEEDED:
        source = Path(importlib.util.find_spec(name).origin).parent
        target = dest / name
        shutil.rmtree(target, ignore_errors=True)

        def skip(folder, names):
            return [n for n in names if n == "__pycache__" or (
                n.startswith("libbitsandbytes_") and not any(n == f"libbitsandbytes_cuda{v}.so" for v in cuda_versions))]

        shutil.copytree(source, target, ignore=skip)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"prepared {', '.join(NEEDED)} in {dest} ({size / 1e6:.0f} MB; CUDA libraries: {', '.join(cuda_versions)})")


def ensure_packages(pkgs: Path) -> None:
    """Import bitsandbytes, peft, accelerate, psutil: vendored under `pkgs`, else installed with pip, else exit 2."""
    import importlib.util

    if pkgs.is_dir():
        sys.path.insert(0, str(pkgs))
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"installing {', '.join(missing)} with pip", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], timeout=240)
        importlib.invalidate_caches()
        if done.returncode or any(importlib.util.find_spec(name) is None for name in missing):
            fail(f"{', '.join(missing)} missing and pip could not install them; prepare them with --prepare-pkgs "
                 "on a machine that has them and pass --pkgs.")


def build_model(shape: dict, mode: str, device: str):
    """A random-weight model of `shape`, prepared as the worker prepares it, with a fresh r=16 q/v adapter."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    config = AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k != "model_type"})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if mode.startswith("qlora"):
        quantize_in_place(model, device)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=mode == "qlora", gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))


def quantize_in_place(model, device: str) -> None:
    """NF4 with double quantization on every decoder linear layer, as from_pretrained(BitsAndBytesConfig) does.

    Quantizing the random bf16 weights in memory avoids writing and reloading a checkpoint of 13-26 GB.
    """
    import bitsandbytes as bnb
    import torch

    layers = model.model.layers
    for block in layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4",
                                                     module=quantized).to(device)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                if device == "cpu":
                    quantized.support_avx512bf16_for_cpu = False  # DESIGN.md: the CPU 4-bit trap
                setattr(parent, name, quantized)
                del child
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft dispatches 4-bit LoRA on it
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_optimizer(model, mode: str, device: str):
    """The worker's optimizer: paged 8-bit AdamW for 4-bit models on a GPU, torch AdamW otherwise."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if mode.startswith("qlora") and device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    return torch.optim.AdamW(params, lr=2e-4)


def packed_batch(examples: int, length: int, vocab: int, device: str):
    """One padding-free row of `examples` examples, positions restarting per example (DataCollatorWithFlattening)."""
    import torch

    ids = torch.randint(3, vocab, (1, examples * length), device=device)
    positions = torch.arange(length, device=device).repeat(examples).unsqueeze(0)
    labels = ids.clone()
    labels[0, ::length] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def train_step(model, optimizer, batch, device: str) -> None:
    """One optimizer step as the Trainer takes it: autocast forward, backward, clip, step, grads set to None."""
    import torch

    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def device_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def predicted(shape: dict, mode: str, examples: int, length: int, device: str):
    from core.planning import TrainingSetup, adapter_counts, estimate_memory, flops_per_token, model_shape
    from core.planning.memory import worker_optimizer
    from core.spec import LoraSpec

    model = model_shape(shape)
    adapter = adapter_counts(model, shape, LoraSpec(r=16, target_modules=["q_proj", "v_proj"]))
    quantization = "nf4" if mode.startswith("qlora") else "none"
    tokens = examples * length
    setup = TrainingSetup(device=device, quantization=quantization, double_quant=True,
                          optimizer=worker_optimizer(quantization, device), gradient_checkpointing=mode == "qlora",
                          tokens=tokens, sequence=tokens, masked=examples > 1, lora_dropout=0.05)
    _, model_flops = flops_per_token(model, adapter, sequence=tokens, masked=examples > 1,
                                     gradient_checkpointing=setup.gradient_checkpointing)
    return estimate_memory(model, adapter, setup), model_flops


def run_mode(name: str, mode: str, args, device: str, peak_tflops: float | None, runtime_bytes: int) -> list[dict]:
    """Build one model in one mode, then train each case; the largest case last so the cache only grows."""
    import torch

    shape = SHAPES[name]
    started = time.time()
    model = build_model(shape, mode, device)
    optimizer = make_optimizer(model, mode, device)
    weights_measured = torch.cuda.memory_allocated() if device == "cuda" else None
    print(f"\n{name} {mode}: built in {time.time() - started:.0f} s", flush=True)
    results = []
    for examples, length in sorted(SMOKE_CASES if device == "cpu" else CASES, key=lambda case: case[0] * case[1]):
        memory, model_flops = predicted(shape, mode, examples, length, device)
        batch = packed_batch(examples, length, shape["vocab_size"], device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch, device)  # warm-up: optimizer states, kernels, paged buffers
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        used = []
        for _ in range(args.steps):
            train_step(model, optimizer, batch, device)
            if device == "cuda":
                torch.cuda.synchronize()
                used.append(device_used())
        seconds = (time.perf_counter() - start) / args.steps
        tokens_per_second = examples * length / seconds
        row = {"model": name, "mode": mode, "examples": examples, "tokens_per_example": length,
               "predicted": memory.model_dump(), "tokens_per_second": round(tokens_per_second, 1),
               "model_tflops_per_second": round(model_flops * tokens_per_second / 1e12, 2)}
        if device == "cuda":
            measured = max(used)
            row.update(
                measured_device=measured, measured_reserved=torch.cuda.max_memory_reserved(),
                measured_allocated=torch.cuda.max_memory_allocated(), weights_measured=weights_measured,
                weights_predicted=memory.quantized_weights + memory.full_precision_weights + memory.adapter_weights,
                runtime_measured=runtime_bytes, error=round(measured / memory.peak - 1, 4),
                mfu=round(model_flops * tokens_per_second / (peak_tflops * 1e12), 4) if peak_tflops else None)
        results.append(row)
        print_row(row)
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def print_row(row: dict) -> None:
    predicted_gib = row["predicted"]["peak"] / GIB
    case = f"{row['examples']}x{row['tokens_per_example']}"
    line = f"  {row['model']:>4} {row['mode']:<5} {case:>7}  predicted {predicted_gib:6.2f} GiB"
    if "measured_device" in row:
        verdict = "ok" if abs(row["error"]) <= TOLERANCE else "OFF"
        line += (f"  measured {row['measured_device'] / GIB:6.2f} GiB (reserved {row['measured_reserved'] / GIB:.2f}, "
                 f"allocated {row['measured_allocated'] / GIB:.2f})  {row['error']:+.1%} {verdict}")
        if row.get("mfu") is not None:
            line += f"  MFU {row['mfu']:.1%}"
    print(line + f"  {row['tokens_per_second']:,.0f} tok/s", flush=True)


def runtime_overhead(device: str) -> int:
    """Device memory in use before any model: the CUDA context, cuBLAS and its workspace (nothing else runs)."""
    import torch

    if device != "cuda":
        return 0
    a = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    return device_used() - torch.cuda.memory_reserved()


def measure(args, device: str) -> dict:
    """In this process: the environment, then every requested model and mode."""
    ensure_packages(args.pkgs)
    import bitsandbytes
    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    runtime = runtime_overhead(device)
    print(f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
          f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; peak {peak} TFLOPS; "
          f"runtime before any model {runtime / GIB:.2f} GiB", flush=True)
    models = ["tiny"] if args.smoke else _items(args.models)
    results = [row for model in models for mode in _items(args.modes)
               for row in run_mode(model, mode, args, device, peak, runtime)]
    return {"device": name, "peak_tflops": peak, "runtime_bytes": runtime, "results": results}


def measure_isolated(args) -> dict:
    """Each model and mode in its own process: paged optimizer buffers and the allocator's cache die with it."""
    report = {"results": []}
    for model in _items(args.models):
        for mode in _items(args.modes):
            with tempfile.TemporaryDirectory() as folder:
                part = Path(folder) / "part.json"
                command = [sys.executable, __file__, "--child", "--models", model, "--modes", mode,
                           "--steps", str(args.steps), "--pkgs", str(args.pkgs), "--json", str(part)]
                command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
                command += ["--smoke"] if args.smoke else []
                done = subprocess.run(command)
                if done.returncode or not part.exists():
                    print(f"{model} {mode}: failed with status {done.returncode}", flush=True)
                    report["results"].append({"model": model, "mode": mode, "failed": done.returncode})
                    continue
                child = json.loads(part.read_text())
            report = {**child, "results": report["results"] + child["results"]}
    return report


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_pkgs:
        prepare_pkgs(args.prepare_pkgs, _items(args.cuda))
        return 0
    if not args.smoke:
        require_cuda()
    report = measure(args, "cpu" if args.smoke else "cuda") if (args.smoke or args.child) else measure_isolated(args)
    out = args.json or Path(os.environ.get("OUT") or ROOT / "bench" / "output") / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.child:
        return 0
    measured = [r for r in report["results"] if "error" in r]
    within = sum(abs(r["error"]) <= TOLERANCE for r in measured)
    print(f"\n{within} of {len(measured)} cases within {TOLERANCE:.0%} of the prediction; results in {out}"
          if measured else f"\nsmoke run done ({len(report['results'])} cases); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
