"""Training throughput: our core vs the common Trainer+peft recipe (padding to max length) vs trl's SFTTrainer.

Same model (SmolLM2-135M-Instruct), data, data order and hyperparameters; each run is its own process
(clean peak RSS), runs are interleaved over rounds, and the report prints ratios against the common
recipe measured in the same invocation. Real tokens are non-pad tokens; every variant's final eval
loss is measured by the same function on the same validation rows. Also: LoRA vs QLoRA peak memory.

    .venv/bin/python bench/train_throughput.py --examples 48 --rounds 1
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("core", "common", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=None, help="Catalogue (SmolLM2 is installed there if missing).")
    parser.add_argument("--train", type=Path, default=ROOT / "examples" / "demo" / "train.jsonl")
    parser.add_argument("--valid", type=Path, default=ROOT / "examples" / "demo" / "valid.jsonl")
    parser.add_argument("--examples", type=int, default=48, help="Training examples (the first N of --train).")
    parser.add_argument("--valid-examples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps of one epoch; overrides --examples.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=1, help="Interleaved repetitions of every variant.")
    parser.add_argument("--child", choices=VARIANTS + ("core-qlora",), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def head_jsonl(source: Path, n: int, dest: Path) -> Path:
    lines = [line for line in source.read_text(encoding="utf-8-sig").splitlines() if line.strip()][:n]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def spec_for(args, quantization: str):
    from core.spec import JobSpec
    from worker.catalogue import SMOLLM2_ID

    return JobSpec(model=SMOLLM2_ID, quantization=quantization, n_epochs=1, batch_size=args.batch_size,
                   micro_batch_size=args.batch_size, learning_rate=args.learning_rate, max_seq_length=args.max_seq_length,
                   warmup_ratio=0.0, lora={"r": 8, "dropout": 0.0}, seed=0, save_steps=10_000, save_total_limit=1)


def eval_rows(spec, tokenizer, valid_path: Path):
    from worker.training.data import read_examples, tokenize_all

    return tokenize_all(read_examples(valid_path), tokenizer, spec.max_seq_length, spec.train_on_inputs).rows


def run_core(args, quantization: str) -> dict:
    """(a) our training core, end to end through `train`."""
    from worker.training import TrainingHooks, train

    progress = []
    result = train(spec_for(args, quantization), args.workdir / "train.jsonl", args.workdir / "valid.jsonl",
                   args.workdir / f"out-{quantization}", TrainingHooks(on_progress=progress.append),
                   models_dir=args.models_dir)
    last = progress[-1]
    return {"real_tokens": last["tokens_seen"], "tokens_per_second": last["tokens_per_second"],
            "steps": result.steps, "final_eval_loss": result.final_eval["loss"]}


def _trainer_args(spec, args, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(args.workdir / "hf"), per_device_train_batch_size=args.batch_size,
                             num_train_epochs=spec.n_epochs, learning_rate=spec.learning_rate, lr_scheduler_type="linear",
                             seed=0, data_seed=0, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, **extra)


def run_common(args) -> dict:
    """(b) the common recipe: Trainer + peft, every row padded to max_seq_length, the same labels as ours."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer

    from worker.catalogue import model_source
    from worker.training import load_tokenizer, to_lora_config
    from worker.training.data import make_collator, read_examples, tokenize_all
    from worker.training.evaluate import evaluate_model

    spec = spec_for(args, "none")
    tokenizer = load_tokenizer(spec.model, args.models_dir)
    rows = tokenize_all(read_examples(args.workdir / "train.jsonl"), tokenizer, spec.max_seq_length, False).rows
    model = AutoModelForCausalLM.from_pretrained(model_source(args.models_dir, spec.model), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, to_lora_config(spec, model.config.to_dict()))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=spec.max_seq_length,
                                      label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(model=model, args=_trainer_args(spec, args, remove_unused_columns=False), train_dataset=rows,
                      data_collator=collator)
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    real = sum(len(r["input_ids"]) for r in rows) * spec.n_epochs
    valid = eval_rows(spec, tokenizer, args.workdir / "valid.jsonl")
    return {"real_tokens": real, "tokens_per_second": real / seconds, "steps": trainer.state.global_step,
            "final_eval_loss": evaluate_model(model, valid, make_collator(True, tokenizer), 8)["loss"]}


def run_trl(args) -> dict:
    """(c) trl's SFTTrainer with its defaults, given the same hyperparameters and conversational data."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from worker.catalogue import model_source
    from worker.training import load_tokenizer, to_lora_config
    from worker.training.data import make_collator
    from worker.training.evaluate import evaluate_model

    spec = spec_for(args, "none")
    tokenizer = load_tokenizer(spec.model, args.models_dir)
    dataset = load_dataset("json", data_files=str(args.workdir / "train.jsonl"), split="train")
    model = AutoModelForCausalLM.from_pretrained(model_source(args.models_dir, spec.model), dtype=torch.float32)
    config = SFTConfig(output_dir=str(args.workdir / "trl"), per_device_train_batch_size=args.batch_size,
                       num_train_epochs=spec.n_epochs, learning_rate=spec.learning_rate, lr_scheduler_type="linear",
                       seed=0, data_seed=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                       max_length=spec.max_seq_length, use_cpu=True)
    torch.manual_seed(0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=to_lora_config(spec, model.config.to_dict()))
    real = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * spec.n_epochs
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    valid = eval_rows(spec, tokenizer, args.workdir / "valid.jsonl")
    return {"real_tokens": real, "tokens_per_second": real / seconds, "steps": trainer.state.global_step,
            "final_eval_loss": evaluate_model(trainer.model, valid, make_collator(True, tokenizer), 8)["loss"]}


def child_main(args) -> None:
    runners = {"core": lambda: run_core(args, "none"), "core-qlora": lambda: run_core(args, "nf4"),
               "common": lambda: run_common(args), "trl": lambda: run_trl(args)}
    report = runners[args.child]()
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(report), flush=True)


def run_child(variant: str, argv: list[str], workdir: Path) -> dict:
    completed = subprocess.run([sys.executable, __file__, *argv, "--child", variant, "--workdir", str(workdir)],
                               capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        sys.exit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    return {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}


def print_report(args, summary: dict[str, dict]) -> None:
    base = summary["common"]
    print(f"\nSmolLM2-135M-Instruct, {args.examples} examples, batch {args.batch_size}, max length {args.max_seq_length}, "
          f"LoRA r=8 q/v, {args.rounds} round(s), median\n")
    print(f"{'variant':<34}{'real tok/s':>11}{'vs (b)':>8}{'peak RSS MB':>13}{'eval loss':>11}{'vs (b)':>9}")
    names = {"core": "(a) lorajobs core (packed)", "common": "(b) Trainer+peft, pad to max",
             "trl": "(c) trl SFTTrainer defaults", "core-qlora": "(a') lorajobs core, QLoRA nf4"}
    for variant, row in summary.items():
        print(f"{names[variant]:<34}{row['tokens_per_second']:>11.1f}{row['tokens_per_second'] / base['tokens_per_second']:>7.2f}x"
              f"{row['peak_rss_mb']:>13.0f}{row['final_eval_loss']:>11.4f}"
              f"{100 * (row['final_eval_loss'] / base['final_eval_loss'] - 1):>+8.2f}%")
    core = summary["core"]
    print(f"\ncore / common = {core['tokens_per_second'] / base['tokens_per_second']:.2f}x (goal >= 2.0), "
          f"core / trl = {core['tokens_per_second'] / summary['trl']['tokens_per_second']:.2f}x (goal >= 1.3), "
          f"eval loss vs common {100 * (core['final_eval_loss'] / base['final_eval_loss'] - 1):+.2f}% (goal within 1%)")
    print(f"peak RSS: LoRA {core['peak_rss_mb']:.0f} MB, QLoRA {summary['core-qlora']['peak_rss_mb']:.0f} MB")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps:
        args.examples = args.steps * args.batch_size
    from core.settings import get_settings

    args.models_dir = args.models_dir or get_settings().models_dir
    if args.child:
        child_main(args)
        return
    from worker.catalogue import install_smollm2

    install_smollm2(args.models_dir)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough += ["--models-dir", str(args.models_dir)]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        head_jsonl(args.train, args.examples, workdir / "train.jsonl")
        head_jsonl(args.valid, args.valid_examples, workdir / "valid.jsonl")
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS + ("core-qlora",)}
        for round_no in range(args.rounds):
            for variant in runs:
                runs[variant].append(run_child(variant, passthrough, workdir))
                print(f"round {round_no + 1} {variant}: {runs[variant][-1]}", flush=True)
    print_report(args, summarize(runs))


if __name__ == "__main__":
    main()
