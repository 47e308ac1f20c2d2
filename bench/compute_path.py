"""Which compute path trains fastest on this machine, measured on the real model, and whether the worker's probe agrees.

Our core trains SmolLM2-135M-Instruct on the demo data once per candidate (`LORAJOBS_CPU_COMPUTE` forces it; the
same child as bench/train_throughput.py, timed around `train()`), over interleaved rounds:

- plain LoRA: float32; bf16 autocast over float32 weights; the base in bfloat16;
- QLoRA: the 4-bit layers' matmuls in float32 and in bfloat16.

It prints real tokens/s (median, min–max) and the final eval loss of each, then what the worker's start-up probe
(worker/training/compute.py, `LORAJOBS_CPU_COMPUTE=auto`) chooses on this machine, so a disagreement shows.

    .venv/bin/python bench/compute_path.py --json test-output/compute_path.json      # about 10 min on 2 cores
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import train_throughput as tt  # noqa: E402

CANDIDATES = {"lora": ("float32", "bf16-autocast", "bfloat16"), "qlora": ("float32", "bfloat16")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="lora,qlora")
    parser.add_argument("--dataset", default="demo", choices=tt.DATASETS)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from core.settings import get_settings
    from worker.catalogue import install_smollm2

    models_dir = get_settings().models_dir
    install_smollm2(models_dir)
    child_args = tt.parse_args(["--examples", str(args.examples), "--datasets", args.dataset])
    child_args.models_dir = models_dir
    runs: dict[str, list[dict]] = {f"{m}:{c}": [] for m in args.modes.split(",") for c in CANDIDATES[m]}
    context = tt.fork_server()
    with tempfile.TemporaryDirectory(prefix="bench-compute-") as tmp:
        child_args.workdir = Path(tmp)
        tt.prepare_data(args.dataset, child_args, child_args.workdir)
        keys = list(runs)
        for round_no in range(args.rounds):
            shift = round_no % len(keys)
            for key in keys[shift:] + keys[:shift]:
                mode, candidate = key.split(":")  # each run forced to one candidate (LORAJOBS_CPU_COMPUTE)
                result = tt.run_child(context, f"core:{mode}:{args.dataset}", child_args, candidate, True)
                runs[key].append(result)
                print(f"round {round_no + 1} {key}: {result['tokens_per_second']:.1f} tok/s, "
                      f"eval loss {result['final_eval_loss']:.4f}", flush=True)

    from worker.training.compute import measured_cpu_path

    summary = {}
    print(f"\n{args.dataset} data, SmolLM2-135M-Instruct, {args.examples} examples, {args.rounds} rounds: real tok/s")
    for key, rs in runs.items():
        summary[key] = {"tokens_per_second": tt.spread([r["tokens_per_second"] for r in rs]),
                        "final_eval_loss": statistics.median(r["final_eval_loss"] for r in rs)}
        tps = summary[key]["tokens_per_second"]
        print(f"{key:<24}{tps['median']:>8.1f} [{tps['min']:.1f}–{tps['max']:.1f}]   eval loss "
              f"{summary[key]['final_eval_loss']:.4f}")
    probe = {}
    for mode in args.modes.split(","):
        path = measured_cpu_path(mode == "qlora")
        fastest = max(CANDIDATES[mode], key=lambda c: summary[f"{mode}:{c}"]["tokens_per_second"]["median"])
        probe[mode] = {"probe_choice": path.choice, "probe_seconds": path.seconds, "fastest_measured": fastest}
        print(f"{mode}: the worker's probe chooses {path.choice}; fastest here: {fastest}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": tt.machine_facts(child_args), "summary": summary, "probe": probe,
                                         "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
