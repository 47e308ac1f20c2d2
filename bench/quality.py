"""Quality under the old and the candidate `auto` rules: loss, exact match and fact recall on held-out prompts.

The datasets come from examples/make_quality_datasets.py (facts Q&A with held-out questions phrased differently
plus a few general questions, style transfer, classification as text). Each configuration trains SmolLM2-135M-
Instruct (converted offline from the packaged GGUF, as the tests do) through the training core, then the
delivered adapter, reloaded on the full-precision base as a server would, answers every held-out prompt greedily
beside the base (worker/training/answers.py), scored by core/quality.py. General questions are scored apart:
they show whether answering outside the domain survives.

    .venv/bin/python bench/quality.py --datasets facts --configs old,defaults --products 4 --json test-output/quality.json

`--extra NAME='{"n_epochs": 20, ...}'` adds a configuration of spec fields (quantization is `none` unless given).
`--curve K` also answers with every K-th epoch's checkpoint (and the last), so one run shows how held-out loss and
stated facts move with training; the held-out loss of every epoch is recorded in any case. Every checkpoint is kept,
and when early stopping cooled the rate before stopping, the checkpoint an immediate stop would have delivered is
answered too (`without_cooldown`): the run is identical up to that point. Each run also records every step's
training loss, learning rate and gradient norm before clipping (`training_log`).

The machine is slow and shared: one run per configuration, so read small differences as noise.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.general import GENERAL_QUESTIONS  # noqa: E402
from core.quality import summarize  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from examples.make_quality_datasets import GENERAL, write  # noqa: E402

# All plain LoRA on this CPU (QLoRA's 4-bit path is slower here and the rules under test are the same). `old` is
# what every default resolved to before the small-dataset rules of issue 15, for any n from 34 to 199 training
# examples (every dataset here): 3 epochs, batch 1, learning rate 1e-4, r 16 on q/v, no early stopping; `defaults`
# is every setting at today's default; the others are the configurations measured in docs/benchmarks.md.
ALL_LINEAR = {"r": 16, "target_modules": "all-linear"}
QV = {"r": 16, "target_modules": "attention-qv"}
CONFIGS = {
    "old": {"quantization": "none", "early_stopping_patience": None, "n_epochs": 3, "batch_size": 1,
            "learning_rate": 1e-4, "lora": QV, "neftune_noise_alpha": None},
    "defaults": {},  # quantization `auto`: plain LoRA here, as the 16-bit base fits this CPU
    "new": {"quantization": "none", "n_epochs": 5, "batch_size": 8, "learning_rate": 1e-3, "lora": ALL_LINEAR},
    # Ablation: only the batch and the learning rate of `new` (epochs and q/v targets as `old`).
    "lr": {"quantization": "none", "n_epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "lora": QV},
    # Ablation: `new` without all-linear targets.
    "qv": {"quantization": "none", "n_epochs": 5, "batch_size": 8, "learning_rate": 1e-3, "lora": QV},
    # Many more passes, batch and learning rate by the `auto` rule; early stopping off to see the whole curve.
    "e20-auto": {"quantization": "none", "n_epochs": 20, "early_stopping_patience": None, "lora": ALL_LINEAR},
    # The same with `new`'s batch and learning rate.
    "e20-b8": {"quantization": "none", "n_epochs": 20, "batch_size": 8, "learning_rate": 1e-3,
               "early_stopping_patience": None, "lora": ALL_LINEAR},
    # Many passes on q/v only, early stopping on: what all-linear adds.
    "qv-e21": {"quantization": "none", "n_epochs": 21, "lora": QV},
    # For --products 12: 7 epochs (as many presentations of each fact as `e20-*` at epoch 7) at `new`'s rate.
    "p12-e7-b8": {"quantization": "none", "n_epochs": 7, "batch_size": 8, "learning_rate": 1e-3, "lora": ALL_LINEAR},
}
MAX_NEW_TOKENS = 32
# The README's demo catalogue (examples/make_demo_dataset.py): 432 chats about many more facts than `facts`, each in
# fewer phrasings, and 60 held-out questions phrased differently.
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"


def same_opening(rows: list[dict], words: int = 3) -> int:
    """How many tuned answers open with the base's first `words` words: whether the adapter kept the base's manner of
    answering outside the domain (the 288-chat adapters answered "A day has 8 hours." where the base explains)."""
    def opening(text: str) -> list[str]:
        return text.lower().split()[:words]

    return sum(opening(row["tuned"]) == opening(row["base"]) for row in rows)


def by_part(rows: list[dict], sides: tuple[str, ...] = ("base", "tuned")) -> dict:
    """Scores over the domain prompts and over the general questions, apart."""
    general = {question for question, _ in GENERAL}
    parts = {}
    for part, keep in (("domain", lambda r: r["prompt"] not in general), ("general", lambda r: r["prompt"] in general)):
        kept = [r for r in rows if keep(r)]
        if kept:
            parts[part] = {side: summarize([r[f"{side}_score"] for r in kept]) for side in sides}
    return parts


def answer_checkpoints(checkpoints: list[Path], models_dir: Path, tokenizer, prompts) -> list[dict]:
    """The tuned answers of each checkpoint's adapter, on a fresh full-precision base, scored by part."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.quality import score_answer
    from worker.catalogue import SMOLLM2_ID, model_source
    from core.general import GENERATION_BATCH
    from worker.training.answers import generate_answers

    curve = []
    for checkpoint in checkpoints:
        base = AutoModelForCausalLM.from_pretrained(model_source(models_dir, SMOLLM2_ID), dtype="auto")
        model = PeftModel.from_pretrained(base, checkpoint).eval()
        rows = []
        for at in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[at:at + GENERATION_BATCH]
            for prompt, answer in zip(batch, generate_answers(model, tokenizer, batch, MAX_NEW_TOKENS)):
                rows.append({"prompt": prompt.prompt, "tuned": answer,
                             "tuned_score": score_answer(answer, prompt.expected, prompt.prompt)})
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        curve.append({"step": state["global_step"], "epoch": round(state["epoch"], 2),
                      "quality": by_part(rows, ("tuned",)), "answers": rows})
        print(json.dumps({k: v for k, v in curve[-1].items() if k != "answers"}), flush=True)
    return curve


def without_cooldown(best: dict | None, evaluations: list[dict], out: Path, models_dir: Path, tokenizer,
                     prompts) -> dict | None:
    """What the job would have delivered had early stopping stopped at once (`early_stopping_cooldown: 0`): the best
    checkpoint up to the step where patience ran out. Training is seeded and the cooldown changes nothing before
    that step, so one run measures both."""
    if not best or best.get("cooled_from") is None:
        return None
    before = [m for m in evaluations if m["step"] <= best["cooled_from"]]
    chosen = min(before, key=lambda m: m["valid_loss"])
    if chosen["step"] == best["step"]:
        return {"step": chosen["step"], "valid_loss": chosen["valid_loss"], "same_as_delivered": True}
    answered = answer_checkpoints([out / "checkpoints" / f"checkpoint-{chosen['step']}"], models_dir, tokenizer, prompts)
    return {"step": chosen["step"], "valid_loss": chosen["valid_loss"], "quality": answered[0]["quality"],
            "answers": answered[0]["answers"]}


def run(name: str, config: str, spec_fields: dict, train_file: Path, valid_file: Path, models_dir: Path, out: Path,
        curve_every: int | None = None, seed: int = 0) -> dict:
    from worker.catalogue import SMOLLM2_ID
    from worker.training import TrainingHooks, train
    from worker.training.answers import answer_side_by_side, general_prompts, sample_prompts
    from worker.training.data import read_examples
    from worker.training.model import adapter_tokenizer, load_adapter_model

    fields = dict(spec_fields)
    # Keep every epoch's checkpoint (up to the cap) to answer with them: the curve's, and the one a run without
    # early stopping's cooldown would have delivered.
    fields.setdefault("save_total_limit", None)
    spec = JobSpec(model=SMOLLM2_ID, max_seq_length=256, seed=seed, answer_samples=0, general_samples=0, **fields)
    evaluations = []

    def progress(p: dict) -> None:  # a line now and then: runs here take many minutes
        if p["step"] % 20 == 0:
            print(f"{name}/{config}: step {p['step']}/{p['total_steps']} loss {p['loss']:.3f}", file=sys.stderr, flush=True)

    def event(level: str, message: str) -> None:
        print(f"{name}/{config}: {message}", file=sys.stderr, flush=True)

    def evaluated(m: dict) -> None:
        if "valid_loss" in m:
            evaluations.append(m)
            print(f"{name}/{config}: step {m['step']} valid_loss {m['valid_loss']:.4f}", file=sys.stderr, flush=True)

    hooks = TrainingHooks(on_metrics=evaluated, on_progress=progress, on_event=event)
    started = time.monotonic()
    result = train(spec, train_file, valid_file, out, hooks, models_dir=models_dir)
    model = load_adapter_model(result.adapter_dir, models_dir)
    tokenizer = adapter_tokenizer(result.adapter_dir, models_dir)
    prompts = sample_prompts(read_examples(valid_file), 10_000, seed=0)
    answered = answer_side_by_side(model, tokenizer, prompts, MAX_NEW_TOKENS, budget_seconds=float("inf"))
    seconds = round(time.monotonic() - started, 1)
    # Every built-in general question (core/general.py), as jobs ask their first `general_samples`: whether
    # answering outside the domain survives, on more questions than the four each facts validation file carries.
    probe = answer_side_by_side(model, tokenizer, general_prompts(len(GENERAL_QUESTIONS)), MAX_NEW_TOKENS,
                                float("inf"))
    curve = None
    if curve_every:
        checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        chosen = [c for i, c in enumerate(checkpoints, 1) if i % curve_every == 0 or i == len(checkpoints)]
        curve = answer_checkpoints(chosen, models_dir, tokenizer, prompts)
    uncooled = without_cooldown(result.best_checkpoint, evaluations, out, models_dir, tokenizer, prompts)
    return {
        "dataset": name, "config": config, "spec": spec_fields, "seed": seed, "quantization": result.quantization,
        "hyperparameters": result.hyperparameters,
        "trainable_parameters": result.parameters["trainable_parameters"],
        "steps": result.steps, "total_steps": result.total_steps, "best_checkpoint": result.best_checkpoint,
        "baseline_loss": result.baseline_eval["loss"], "final_loss": result.final_eval["loss"],
        "train_seconds": result.train_seconds, "seconds": seconds,
        "answer_seconds": answered["quality"]["seconds"], "quality": by_part(answered["answers"]),
        "evaluations": [{"step": m["step"], "valid_loss": round(m["valid_loss"], 4)} for m in evaluations],
        "curve": curve, "without_cooldown": uncooled, "answers": answered["answers"],
        "training_log": training_log(out / "training_log.csv"),
        "general_probe": {"quality": {**{side: probe["quality"][side] for side in ("base", "tuned")},
                                      "same_opening_as_base": same_opening(probe["answers"])},
                          "answers": probe["answers"]},
    }


def training_log(path: Path) -> list[dict]:
    """Every step's training loss, learning rate and gradient norm (before clipping): where held-out loss bumps,
    whether the step's gradients did too."""
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_loss")]
    return [{"step": int(row["step"]), **{key: float(row[key]) for key in ("train_loss", "learning_rate", "grad_norm")
                                           if row.get(key)}} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="facts,style,classify", help="of facts, style, classify, demo")
    parser.add_argument("--configs", default="old,new")
    parser.add_argument("--json", type=Path, default=Path("test-output/quality.json"))
    parser.add_argument("--products", type=int, default=12, help="products in the facts catalogue (4 facts each, at most 24)")
    parser.add_argument("--models-dir", type=Path, help="a catalogue already holding SmolLM2 (else converted afresh)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                        help="another configuration: spec fields as JSON (repeatable; run after --configs)")
    parser.add_argument("--curve", type=int, metavar="K", help="also answer with every K-th epoch's checkpoint")
    parser.add_argument("--threads", type=int, help="torch threads (two runs side by side: 1 each)")
    parser.add_argument("--seed", type=int, default=0, help="the jobs' seed (the adapter's initial weights, the order)")
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",") if name}
    for extra in args.extra:
        name, _, fields = extra.partition("=")
        configs[name] = json.loads(fields)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from worker.catalogue import install_smollm2

    work = Path(tempfile.mkdtemp(prefix="lorajobs-quality-"))
    models_dir = args.models_dir or work / "models"
    install_smollm2(models_dir)
    files = write(work / "data", products=args.products)
    files["demo"] = (DEMO / "train.jsonl", DEMO / "valid.jsonl")  # the README's catalogue, as a user uploads it
    runs = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.datasets.split(","):
        for config, fields in configs.items():
            runs.append(run(name, config, fields, *files[name], models_dir, work / f"{name}-{config}", args.curve,
                            args.seed))
            line = {k: v for k, v in runs[-1].items() if k not in ("answers", "curve", "without_cooldown", "general_probe")}
            line["general_probe"] = runs[-1]["general_probe"]["quality"]
            line["without_cooldown"] = {k: v for k, v in (runs[-1]["without_cooldown"] or {}).items() if k != "answers"}
            print(json.dumps(line), flush=True)
            args.json.write_text(json.dumps({"runs": runs, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
