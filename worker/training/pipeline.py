"""`train`: base model + dataset + job spec -> adapter, as a list of named steps.

load data -> tokenize (format inside) -> pack (the collator) -> load model -> attach adapter -> train ->
evaluate -> save. Knows nothing of Celery: the caller's `TrainingHooks` are its only outside contact.
"""

import time
from functools import partial
from pathlib import Path

from core.archives import sha256_file
from core.datasets.tokens import length_summary
from core.errors import InvalidRequest
from core.planning import GpuClass, cpu_class, make_plan
from core.planning.memory import worker_optimizer
from core.spec import JobSpec, ResolvedHyperparameters, model_width, resolve_auto
from worker.catalogue import base_provenance
from worker.training.answers import answerer, report_answers
from worker.training.artifacts import (
    TrainingResult,
    library_versions,
    log_rows,
    write_model_card,
    write_training_log,
)
from worker.training.attention import attend_in_float32_below, use_packed_attention
from worker.training.best import adopt_best_checkpoint, cooldown_of, report_selection
from worker.training.compute import attention_path, compute_path
from worker.training.data import (
    with_boundaries,
    TokenizedData,
    make_collator,
    read_examples,
    split_validation,
    tokenize_all,
    training_collator,
)
from worker.training.evaluate import evaluate_model
from worker.training.hooks import TrainingHooks
from worker.training.replay import Replay, is_chat_data, replay_examples
from worker.training.model import (
    attach_adapter,
    load_full_precision_base,
    base_config,
    check_4bit_layout,
    compute_description,
    load_adapter_model,
    load_base_model,
    load_dequantized_base,
    load_tokenizer,
    name_base_model,
    pick_device,
)


def load_data(spec: JobSpec, train_path: Path, valid_path: Path | None):
    """Load data: training and validation examples (a separate file, or a seeded fraction of the training file)."""
    train_examples = read_examples(train_path)
    if valid_path is not None:
        return train_examples, read_examples(valid_path)
    return split_validation(train_examples, spec.validation_fraction, spec.seed)


def tokenize_data(spec: JobSpec, tokenizer, train_examples, valid_examples) -> tuple[TokenizedData, TokenizedData]:
    """Tokenize both sets; refuse a training set with nothing left to train on."""
    train_data = tokenize_all(train_examples, tokenizer, spec.max_seq_length, spec.train_on_inputs)
    valid_data = tokenize_all(valid_examples, tokenizer, spec.max_seq_length, spec.train_on_inputs)
    if not train_data.rows:
        raise InvalidRequest(
            f"No training example has a trained token within max_seq_length={spec.max_seq_length}.", param="max_seq_length"
        )
    return train_data, valid_data


def training_arguments(spec: JobSpec, hp: ResolvedHyperparameters, checkpoints_dir: Path, device: str,
                       has_validation: bool = False):
    """The Trainer's arguments for the resolved hyperparameters on `device`."""
    import torch
    from transformers import TrainingArguments

    from worker.training.best import selection_arguments

    # bf16 autocast: on a GPU that supports it, and on a CPU where plain LoRA measured fastest that way.
    bf16 = (device == "cuda" and torch.cuda.is_bf16_supported()) or compute_path(spec, device).autocast_bf16
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=hp.micro_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.n_epochs,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # a float below 1 is a fraction of the total steps in transformers 5
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        data_seed=spec.seed,
        optim=worker_optimizer(spec.quantization, device),
        bf16=bf16,
        fp16=device == "cuda" and not bf16,
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="steps" if spec.save_steps else "epoch",
        save_steps=spec.save_steps or 500,
        save_total_limit=spec.save_total_limit,
        # Our callback evaluates (token accuracy needs no stored logits that way); with validation data the Trainer
        # also asks it at every checkpoint, to deliver the best one (worker/training/best.py).
        **({"eval_strategy": "no"} | selection_arguments(spec, has_validation)),
        include_num_input_tokens_seen="all" if spec.packing else "non_padding",  # packed rows hold no padding
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        report_to="none",
    )


def build_trainer(spec, hp, model, tokenizer, train_data, collator, checkpoints_dir, device, callback,
                  valid_rows: list | None = None):
    """A transformers Trainer over the token rows with our hooks callback (and early stopping with validation rows,
    which the Trainer hands back to the callback's evaluation)."""
    from transformers import PrinterCallback

    from worker.training.best import checkpoint_evaluating_trainer, selection_callbacks
    from worker.training.neftune import noise_callbacks

    trainer = checkpoint_evaluating_trainer()(
        model=model,
        args=training_arguments(spec, hp, checkpoints_dir, device, bool(valid_rows)),
        train_dataset=train_data.rows,
        eval_dataset=valid_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[callback, *selection_callbacks(spec, bool(valid_rows)), *noise_callbacks(spec)],
        hooks_callback=callback,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the hooks, not stdout
    return trainer


def run_training(trainer, spec: JobSpec, resume_from: Path | None) -> float:
    """Train: guard the 4-bit layout, then run (or resume) the Trainer; return the wall-clock seconds of `train()`."""
    if spec.quantization != "none":
        check_4bit_layout(trainer.model)
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return time.monotonic() - start


def evaluate_baseline_and_final(model, evaluate) -> tuple[dict | None, dict | None]:
    """Evaluate the frozen base (adapter disabled) and the adapter, both after training.

    The base never changes during training, so evaluating it afterwards gives the same numbers as before,
    and no inference ever runs on a 4-bit model before it is trained (DESIGN.md, the CPU 4-bit trap).
    """
    with model.disable_adapter():
        baseline = evaluate(model)
    return baseline, evaluate(model)


def save_adapter(model, tokenizer, out_dir: Path, model_id: str) -> Path:
    """Save: the final adapter as a standard PEFT folder naming its catalogue base, with the tokenizer and the
    chat template it was trained with (a serving stack then formats prompts the same way)."""
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    name_base_model(adapter_dir, model_id)
    return adapter_dir


def parameter_counts(model) -> dict:
    """Trainable and total parameters as PEFT counts them (the total includes the adapter)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0}


def _release() -> None:
    """Give memory back after the caller dropped its references (a 7B base must leave before the next loads)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_served(spec: JobSpec, adapter_dir: Path, models_dir: Path, device: str, evaluate,
                    answer=None) -> tuple[dict, dict | None]:
    """What a QLoRA adapter scores where it is served, and which merge to export.

    The adapter was trained on the 4-bit base but is served on the full-precision one (vLLM, TGI, PEFT) or merged.
    Both merges are scored: into the full-precision base, and into the 4-bit base dequantized to 16 bit (which
    keeps the rounding the adapter learned to correct). The merged export uses the better one. `answer`, when
    given, answers held-out prompts with the adapter as served (worker/training/answers.py).
    """
    from peft import PeftModel

    served = load_adapter_model(adapter_dir, models_dir).to(device)
    on_full_precision = evaluate(served)
    answered = answer(served) if answer else None
    merged_full = evaluate(served.merge_and_unload())
    del served
    _release()
    dequantized = load_dequantized_base(spec, models_dir, device)
    merged_dequantized = evaluate(PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload())
    del dequantized
    _release()
    best = "dequantized_4bit" if merged_dequantized["loss"] < merged_full["loss"] else "full_precision"
    return {"adapter_on_full_precision_base": on_full_precision, "merged_full_precision": merged_full,
            "merged_dequantized_4bit": merged_dequantized, "merge_base": best}, answered


def local_quantization(spec: JobSpec, config: dict, train_data: TokenizedData, device: str,
                       hooks: TrainingHooks) -> JobSpec:
    """Resolve quantization `auto` as the planner does (core/planning/plan.py), for this machine's device alone."""
    import torch

    if device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory / 1024**3
        here = GpuClass(name=torch.cuda.get_device_name(0), memory_gib=memory, tflops=100)
    else:
        here = cpu_class()
    stats = length_summary(len(row["input_ids"]) for row in train_data.rows)
    made = make_plan(config, spec, token_stats=stats, gpu_classes=[here])
    hooks.event("info", made.notes[0])
    return spec.model_copy(update={"quantization": made.quantization})


def _dropped(train_data: TokenizedData, valid_data: TokenizedData) -> dict:
    reasons = {f"training: {r}": n for r, n in train_data.dropped.items()}
    reasons |= {f"validation: {r}": n for r, n in valid_data.dropped.items()}
    return {"count": sum(reasons.values()), "reasons": reasons}


def general_replay(spec: JobSpec, hp: ResolvedHyperparameters, base, tokenizer, device: str, models_dir: Path,
                   hooks: TrainingHooks, resume_from: Path | None) -> Replay | None:
    """The general answers of the base that train beside the data (worker/training/replay.py), with an event that
    says so; None when the job replays none.

    A resumed job trains on those stored with its checkpoint. A 4-bit base on the CPU is not asked (no inference on
    a 4-bit model before training it there, DESIGN.md): with `base` None, the full-precision base, the one the adapter
    is served on, answers instead, in float32 (fast on every CPU). Failing to generate (an architecture's `generate`, memory) is a
    warning, as for the held-out answers: the job trains without replay rather than fail before its first step. So is
    a stored replay that cannot be read: the base answers anew.
    """
    if not hp.general_replay:
        return None
    try:
        replay = Replay.load(resume_from, hp.general_replay)
    except (ValueError, OSError) as exc:  # a damaged checkpoint file: answer anew rather than fail the job
        hooks.event("warn", f"General replay: {exc}; the base answers its prompts anew."[:500])
        replay = None
    if replay is None:
        try:
            if base is None:
                full_precision = load_full_precision_base(spec.model, models_dir, dtype="float32")
                try:
                    replay = replay_examples(full_precision, tokenizer, hp.general_replay)
                finally:
                    del full_precision
                    _release()
            else:
                replay = replay_examples(base, tokenizer, hp.general_replay)
        except Exception as exc:
            _release()
            # Stored with the checkpoints as skipped: a resumed attempt, maybe on a larger GPU, keeps the rows its
            # epochs began with rather than answer anew and change the steps mid-job.
            replay = Replay([], hp.general_replay, 0.0, skipped=f"{type(exc).__name__}: {exc}")
    hooks.event("warn" if replay.skipped else "info", replay.message())
    return replay


def replays_before_loading(spec: JobSpec, device: str) -> bool:
    """A 4-bit job on the CPU replays the full-precision base's answers, loaded and freed before its 4-bit base
    loads: never both in memory at once."""
    return device == "cpu" and spec.quantization != "none"


def train(
    spec: JobSpec,
    train_path: Path,
    valid_path: Path | None,
    out_dir: Path,
    hooks: TrainingHooks | None = None,
    *,
    models_dir: Path,
    resume_from: Path | None = None,
    resume_best: Path | None = None,
    micro_batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    save_every_seconds: float | None = None,
) -> TrainingResult:
    """Fine-tune `spec.model` on `train_path` and write checkpoints, the adapter and the log under `out_dir`.

    `micro_batch_size` and `gradient_checkpointing`, when given, are the job's plan for its GPU class (or its
    out-of-memory retry): the batch stays the spec's, accumulation makes up the difference. `save_every_seconds`
    adds a checkpoint after that much training since the last one. `resume_best`: the best checkpoint so far when
    `resume_from` is another one (`best_step_to_fetch`), so that a resumed job still delivers it.
    """
    from transformers import set_seed

    from worker.training.callback import HooksCallback

    hooks = hooks or TrainingHooks()
    if micro_batch_size is not None:
        spec = spec.model_copy(update={"micro_batch_size": micro_batch_size})
    out_dir = Path(out_dir)
    device = pick_device()
    tokenizer = load_tokenizer(spec.model, models_dir, spec.chat_template)
    train_examples, valid_examples = load_data(spec, Path(train_path), Path(valid_path) if valid_path else None)
    train_data, valid_data = tokenize_data(spec, tokenizer, train_examples, valid_examples)
    dropped = _dropped(train_data, valid_data)
    if dropped["count"]:
        hooks.event("warning", f"Dropped {dropped['count']} examples: {dropped['reasons']}.")
    config = base_config(spec.model, models_dir)
    if spec.quantization == "auto":  # a job from the API arrives with the plan's choice; `lorajobs train` does not
        spec = local_quantization(spec, config, train_data, device, hooks)
    hp = resolve_auto(spec, len(train_data.rows), model_width(config))
    collator = make_collator(spec.packing, tokenizer)

    if hp.general_replay and not is_chat_data(train_examples):
        hooks.event("info", "General replay is off: it replays chats, and this training data is text.")
        hp = hp.model_copy(update={"general_replay": 0})

    first = replays_before_loading(spec, device)
    replay = general_replay(spec, hp, None, tokenizer, device, models_dir, hooks, resume_from) if first else None
    set_seed(spec.seed)  # the adapter's initial weights
    base = load_base_model(spec, models_dir, device, gradient_checkpointing)
    if not first:
        replay = general_replay(spec, hp, base, tokenizer, device, models_dir, hooks, resume_from)
    n_examples = len(train_data.rows)  # the team's; replayed answers are counted apart
    if replay is not None:
        set_seed(spec.seed)  # whatever generating drew, the adapter starts from the seed's weights
        train_data.rows += tokenize_all(replay.examples, tokenizer, spec.max_seq_length, spec.train_on_inputs).rows
    compute = compute_description(spec, device)
    if spec.packing and use_packed_attention(base):  # attention per packed example, not over a dense (ΣL)² mask
        attention = attention_path(spec, device, base.config)  # probed only where attention computes in bf16
        if attention:
            attend_in_float32_below(base, attention.fp32_below)
            compute = f"{compute}; {attention.description()}"
    model = attach_adapter(base, spec)
    parameters = parameter_counts(model)
    if hooks.on_parameters:
        hooks.on_parameters(dict(parameters))
    evaluate = partial(evaluate_model, rows=valid_data.rows, collator=with_boundaries(collator, model),
                       micro_batch_size=hp.micro_batch_size)
    callback = HooksCallback(hooks, evaluate, spec.eval_steps, spec.model, save_every_seconds, replay)
    trainer = build_trainer(spec, hp, model, tokenizer, train_data, training_collator(collator, model),
                            out_dir / "checkpoints", device, callback, valid_rows=valid_data.rows)
    replayed = (f" and {len(train_data.rows) - n_examples} replayed general answers"
                if replay is not None and not replay.skipped else "")
    hooks.event("info", f"Training {n_examples} examples{replayed} on {device}: {hp.n_epochs} epochs, batch {hp.batch_size} "
                f"(micro-batch {hp.micro_batch_size} × {hp.gradient_accumulation_steps}); "
                f"{compute}.")
    if resume_from is not None and resume_best is not None:
        adopt_best_checkpoint(resume_from, resume_best, out_dir / "checkpoints")
    train_seconds = run_training(trainer, spec, resume_from)
    state = trainer.state

    status = "cancelled" if callback.cancelled else "succeeded"
    baseline, final = (None, None) if callback.cancelled else evaluate_baseline_and_final(model, evaluate)
    selected = None if final is None else report_selection(trainer.state, spec, hooks, cooldown_of(trainer))
    if final is not None and "valid_loss" not in callback.last_metrics:  # the last step was not evaluated yet
        metrics = {"step": state.global_step, "valid_loss": final["loss"], "valid_mean_token_accuracy": final["token_accuracy"]}
        state.log_history.append(metrics)
        if hooks.on_metrics:
            hooks.on_metrics(dict(metrics))
    adapter_dir = save_adapter(model, tokenizer, out_dir, spec.model)
    write_training_log(out_dir / "training_log.csv", log_rows(state.log_history))
    answer = None if final is None else answerer(spec, tokenizer, valid_examples, train_seconds, hooks)
    answered = answer(model) if answer and spec.quantization == "none" else None
    served = None
    if final is not None and spec.quantization != "none":
        del trainer, model, callback
        _release()
        hooks.event("info", "Scoring the adapter as it is served: on the full-precision base, and both merges.")
        served, answered = evaluate_served(spec, adapter_dir, models_dir, device, evaluate, answer)
    if answered:
        report_answers(answered["quality"], (selected or {}).get("step", state.global_step), hooks)

    sha = {"training_file": sha256_file(Path(train_path))}
    if valid_path:
        sha["validation_file"] = sha256_file(Path(valid_path))
    result = TrainingResult(
        adapter_dir=adapter_dir,
        status=status,
        trained_tokens=state.num_input_tokens_seen,
        steps=state.global_step,
        total_steps=state.max_steps,
        train_seconds=round(train_seconds, 3),
        hyperparameters=hp.model_dump(),
        baseline_eval=baseline,
        final_eval=final,
        dropped_examples=dropped,
        n_train_examples=n_examples,
        n_valid_examples=len(valid_data.rows),
        truncated_examples=train_data.truncated,
        data_sha256=sha,
        parameters=parameters,
        served_eval=served,
        quantization=spec.quantization,
        best_checkpoint=selected,
        quality=answered["quality"] if answered else None,
        answers=answered["answers"] if answered else None,
        chat_template=tokenizer.lorajobs_chat_template,
        base_provenance=base_provenance(models_dir, spec.model),
        library_versions=library_versions(),
        compute=compute,
    )
    write_model_card(adapter_dir, spec.model_dump(mode="json"), result)
    hooks.event("info", f"Training {status} after {result.steps} steps.")
    return result
