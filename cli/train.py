"""`lorajobs train`: run the training core on local files, without the service, to debug a spec."""

import json
import sys
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from core.errors import LorajobsError
from core.settings import get_settings
from core.spec import JobSpec


def register(sub) -> None:
    parser = sub.add_parser("train", help="Train an adapter from a spec and local JSONL files (no service needed).")
    parser.add_argument("--spec", type=Path, required=True, help="Job spec JSON (docs/job-spec.md).")
    parser.add_argument("--train", type=Path, required=True, help="Training data, JSONL.")
    parser.add_argument("--valid", type=Path, default=None, help="Validation data, JSONL (default: a held-out fraction).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder: checkpoints/, adapter/, training_log.csv.")
    parser.add_argument("--resume-from", type=Path, default=None, help="A checkpoint folder to continue from.")
    parser.add_argument("--models-dir", type=Path, default=None, help="Catalogue folder (LORAJOBS_MODELS_DIR).")
    parser.set_defaults(handler=cmd_train)


def read_spec(path: Path) -> JobSpec:
    """The spec file as a JobSpec; exits naming the offending fields when it is invalid."""
    try:
        return JobSpec.model_validate(json.loads(path.read_text()))
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in error.errors())
        sys.exit(f"lorajobs: invalid spec {path}: {details}")


def progress_hooks(bar: tqdm):
    """Hooks that drive a tqdm bar and print events and evaluations above it."""
    from worker.training import TrainingHooks

    def on_progress(progress: dict) -> None:
        bar.total = progress["total_steps"]
        bar.n = progress["step"]
        bar.set_postfix(loss=f"{progress['loss']:.4f}", tok_s=f"{progress['tokens_per_second']:.0f}", refresh=False)
        bar.refresh()

    def on_metrics(metrics: dict) -> None:
        if "valid_loss" in metrics:
            bar.write(f"step {metrics['step']}: valid loss {metrics['valid_loss']:.4f}, "
                      f"token accuracy {metrics['valid_mean_token_accuracy']:.3f}")

    return TrainingHooks(on_progress=on_progress, on_metrics=on_metrics, on_event=lambda level, msg: bar.write(f"{level}: {msg}"))


def cmd_train(args) -> int:
    from worker.training import train

    spec = read_spec(args.spec)
    models_dir = args.models_dir or get_settings().models_dir
    with tqdm(desc="training", unit="step") as bar:
        try:
            result = train(spec, args.train, args.valid, args.out, progress_hooks(bar),
                           models_dir=models_dir, resume_from=args.resume_from)
        except LorajobsError as error:
            bar.write(f"lorajobs: {error.message}")
            return 1
    (args.out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(json.dumps({k: result.to_dict()[k] for k in ("status", "steps", "baseline_eval", "final_eval", "adapter_dir")}, indent=2))
    return 0
