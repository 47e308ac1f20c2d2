"""`lorajobs plan`: a job's pre-flight plan from a model's config.json alone — parameters, memory, fit, duration."""

import json
from pathlib import Path

from pydantic import ValidationError

from core.catalogue import resolve_model
from core.errors import LorajobsError
from core.planning import Plan, default_gpu_classes, make_plan, parse_gpu_classes
from core.planning.memory import GIB
from core.settings import get_settings
from core.spec import JobSpec

PRESETS = ("attention-qv", "attention", "all-linear")


def register(sub) -> None:
    parser = sub.add_parser("plan", help="Plan a job before it runs: parameters, GPU memory, fit and duration.",
                            description="Reads only the model's config.json: no weights, no GPU, no service needed.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A catalogue model id (see `lorajobs models list`).")
    source.add_argument("--config", type=Path, help="A model's config.json, to size hardware before downloading it.")
    parser.add_argument("--models-dir", type=Path, default=None, help="Catalogue folder (LORAJOBS_MODELS_DIR).")
    parser.add_argument("--spec", type=Path, help="A JSON file of job-spec fields (docs/job-spec.md); flags override it.")
    parser.add_argument("--quantization", choices=("auto", "nf4", "fp4", "none"))
    parser.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization.")
    parser.add_argument("--r", type=int, help="LoRA rank.")
    parser.add_argument("--target-modules", help=f"A preset ({', '.join(PRESETS)}) or comma-separated layer names.")
    parser.add_argument("--dora", action="store_true", help="Weight-decomposed LoRA.")
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--no-packing", action="store_true", help="Pad micro-batches instead of packing examples.")
    parser.add_argument("--examples", type=int, help="Training examples (after the validation split).")
    parser.add_argument("--text", action="store_true",
                        help="The data is plain text ({\"text\": …} lines): no general replay is planned beside it.")
    parser.add_argument("--mean-tokens", type=float, help="Mean tokens per example: gives tokens and durations.")
    parser.add_argument("--max-tokens", type=int, help="Tokens of the longest example (default: max_seq_length).")
    parser.add_argument("--gpu-classes", help="NAME[:MEMORY_GIB[:TFLOPS]],... (default: LORAJOBS_GPU_CLASSES, else "
                                              "gpu-24g, gpu-48g, gpu-80g, gpu-141g and this machine's CPU).")
    parser.add_argument("--json", action="store_true", help="Print the plan object as JSON.")
    parser.set_defaults(handler=cmd_plan)


def _spec(args, model_id: str) -> JobSpec:
    fields = json.loads(args.spec.read_text()) if args.spec else {}
    lora = dict(fields.pop("lora", {}))
    flags = {"quantization": args.quantization, "max_seq_length": args.max_seq_length,
             "micro_batch_size": args.micro_batch_size, "batch_size": args.batch_size, "n_epochs": args.epochs}
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.no_double_quant:
        fields["double_quant"] = False
    if args.no_packing:
        fields["packing"] = False
    if args.r is not None:
        lora["r"] = args.r
    if args.target_modules:
        targets = args.target_modules
        lora["target_modules"] = targets if targets in PRESETS else [t.strip() for t in targets.split(",") if t.strip()]
    if args.dora:
        lora["use_dora"] = True
    return JobSpec.model_validate({**fields, "model": model_id, "lora": lora})


def _token_stats(args, spec: JobSpec) -> dict | None:
    if args.mean_tokens is None:
        return None
    longest = args.max_tokens or spec.max_seq_length
    return {"count": args.examples or 1, "mean": args.mean_tokens, "p95": longest, "max": longest}


def cmd_plan(args) -> int:
    try:
        if args.config:
            config_file, model_id = args.config, args.config.resolve().parent.name or "config"
        else:
            models_dir = args.models_dir or get_settings().models_dir
            config_file, model_id = resolve_model(models_dir, args.model).path / "config.json", args.model
        config = json.loads(config_file.read_text())
        spec = _spec(args, model_id)
        configured = args.gpu_classes or get_settings().gpu_classes  # the deployment's classes, as the API plans
        classes = parse_gpu_classes(configured) if configured else default_gpu_classes()
        plan = make_plan(config, spec, token_stats=_token_stats(args, spec), n_examples=args.examples,
                         gpu_classes=classes, text_data=args.text)
    except LorajobsError as error:
        print(f"lorajobs: {error.message}")
        return 1
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in error.errors())
        print(f"lorajobs: invalid spec: {details}")
        return 1
    except (OSError, ValueError) as error:
        print(f"lorajobs: {error}")
        return 1
    print(plan.model_dump_json(indent=2) if args.json else render(plan, spec))
    return 0


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def render(plan: Plan, spec: JobSpec) -> str:
    """The plan as a short table for people."""
    lines = []
    if plan.trainable_parameters is not None:
        lines.append(f"{plan.model} ({plan.model_type}): {plan.trainable_parameters:,} trainable of "
                     f"{plan.total_parameters:,} parameters ({plan.trainable_percent} %); LoRA r={spec.lora.r} on "
                     f"{', '.join(plan.adapted_modules)} ({plan.adapted_layers} adapted linear layers)")
    else:
        lines.append(f"{plan.model} ({plan.model_type or 'unknown type'})")
    base = "LoRA, 16-bit base (bf16 or fp32 on a CPU, as measured)" if plan.quantization == "none" else \
        f"QLoRA {plan.quantization}{' + double quant' if spec.double_quant else ''}"
    data = f"max_seq_length {plan.max_seq_length}, batch {plan.batch_size}, {plan.n_epochs} epochs"
    if plan.n_examples is not None:
        data += f" of {plan.n_examples:,} examples"
        if plan.replayed_examples:
            data += f" and up to {plan.replayed_examples} replayed general answers"
    if plan.training_tokens is not None:
        data += f", {plan.training_tokens:,} tokens, {plan.steps:,} steps"
    lines += [f"{base}; {data}", ""]
    header = ("class", "GiB", "fits", "micro×acc", "ckpt", "peak", "weights", "adapter", "activ.", "other",
              "duration")
    rows = [header]
    for c in plan.classes:
        if c.memory is None:
            rows.append((c.name, f"{c.memory_gib:g}", "?", *["-"] * 8))
            continue
        m = c.memory
        rows.append((
            c.name, f"{c.memory_gib:g}", "yes" if c.fits else "no",
            f"{c.micro_batch_size}×{c.gradient_accumulation_steps}", "yes" if c.gradient_checkpointing else "no",
            _gib(m.peak), _gib(m.quantized_weights + m.full_precision_weights),
            _gib(m.adapter_weights + m.gradients + m.optimizer_states), _gib(m.activations + m.logits),
            _gib(m.overhead), _duration(c.duration_seconds)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines += ["", f"Smallest class that fits: {plan.smallest_fitting_class or 'none'}"]
    lines += [f"Advice: {item}" for item in plan.advice]
    lines += [f"Note: {item}" for item in plan.notes]
    return "\n".join(lines)
