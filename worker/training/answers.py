"""Answers side by side: greedy answers of the base and of the tuned model to a fixed sample of held-out prompts.

Held-out loss says a model learned the data's shape; these answers, scored by core/quality.py, say whether it
states the facts. The tuned answers come from the adapter as it is served (on the full-precision base for QLoRA).
Generation is bounded so it never dominates a job: at most `answer_samples` prompts, `answer_max_new_tokens`
tokens each, and it stops starting new batches after `answer_budget_seconds` (docs/job-spec.md).
"""

import random
import re
import time
from dataclasses import dataclass
from functools import partial

from core.datasets.formats import Example
from core.general import GENERAL_QUESTIONS, GENERATION_BATCH
from core.quality import score_answer, summarize
from worker.training.data import end_of_turn_tokens, render_chat
from worker.training.evaluate import eval_mode
from worker.training.hooks import TrainingHooks

MIN_BUDGET_SECONDS = 60.0  # a short job still gets a useful sample
BUDGET_SHARE_OF_TRAINING = 0.25  # a long job spends at most a quarter of its training time more on answers
GENERAL_MAX_NEW_TOKENS = 64  # a general question's fact comes early even in a rambling answer; half the default cost


@dataclass(frozen=True)
class HeldOutPrompt:
    """A held-out chat cut before its last assistant turn, and that turn as the expected answer."""

    messages: list[dict]
    expected: str

    @property
    def prompt(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def answer_budget_seconds(train_seconds: float) -> float:
    return max(MIN_BUDGET_SECONDS, BUDGET_SHARE_OF_TRAINING * train_seconds)


def sample_prompts(examples: list[Example], n: int, seed: int) -> list[HeldOutPrompt]:
    """A fixed sample (by the job's seed) of held-out chats that end with an assistant turn after a user turn."""
    usable = []
    for example in examples:
        turns = example.turns
        if example.kind != "chat" or len(turns) < 2 or turns[-1].role != "assistant" or turns[-2].role != "user":
            continue
        usable.append(HeldOutPrompt([{"role": t.role, "content": t.content} for t in turns[:-1]], turns[-1].content))
    random.Random(seed).shuffle(usable)
    return usable[:n]


def generate_answers(model, tokenizer, prompts: list[HeldOutPrompt], max_new_tokens: int) -> list[str]:
    """Greedy answers, left-padded in one batch, stopping at the template's end of turn."""
    return [text for text, _ in generate_finished(model, tokenizer, prompts, max_new_tokens)]


def generate_finished(model, tokenizer, prompts: list[HeldOutPrompt], max_new_tokens: int) -> list[tuple[str, bool]]:
    """`generate_answers`, each answer with whether it ended at an end of turn (False: cut at `max_new_tokens`)."""
    import torch

    texts = [render_chat(p.messages, tokenizer, add_generation_prompt=True) for p in prompts]
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(list(end_of_turn_tokens(tokenizer))) if i is not None]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                                do_sample=False, use_cache=True, eos_token_id=stop_ids or None,
                                pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [(_printable(tokenizer.decode(row, skip_special_tokens=True)), bool(set(row.tolist()) & set(stop_ids)))
            for row in new_tokens]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _printable(text: str) -> str:
    """Control characters an untrained model emits have no place on a page (nor NUL in a database)."""
    return _CONTROL.sub("", text).strip()


def general_prompts(n: int) -> list[HeldOutPrompt]:
    """The first `n` built-in general questions (core/general.py), asked with no system prompt."""
    return [HeldOutPrompt([{"role": "user", "content": question}], answer) for question, answer in GENERAL_QUESTIONS[:n]]


def answer_side_by_side(model, tokenizer, prompts: list[HeldOutPrompt], max_new_tokens: int,
                        budget_seconds: float) -> dict:
    """Base (adapter disabled) and tuned answers for each prompt, scored, with the figures over the sample.

    Batches are answered by both models before the next starts, so every answered prompt has both answers; no
    batch starts once `budget_seconds` are spent.
    """
    start = time.monotonic()
    rows: list[dict] = []
    with eval_mode(model):
        for at in range(0, len(prompts), GENERATION_BATCH):
            if rows and time.monotonic() - start > budget_seconds:
                break
            batch = prompts[at:at + GENERATION_BATCH]
            with model.disable_adapter():
                base = generate_answers(model, tokenizer, batch, max_new_tokens)
            tuned = generate_answers(model, tokenizer, batch, max_new_tokens)
            for prompt, base_answer, tuned_answer in zip(batch, base, tuned):
                rows.append({"prompt": prompt.prompt, "expected": prompt.expected, "base": base_answer,
                             "tuned": tuned_answer,
                             "base_score": score_answer(base_answer, prompt.expected, prompt.prompt),
                             "tuned_score": score_answer(tuned_answer, prompt.expected, prompt.prompt)})
    quality = {
        "sample": len(prompts), "answered": len(rows), "max_new_tokens": max_new_tokens,
        "seconds": round(time.monotonic() - start, 2),
        "base": summarize([r["base_score"] for r in rows]), "tuned": summarize([r["tuned_score"] for r in rows]),
    }
    return {"quality": quality, "answers": rows}


def quality_message(quality: dict) -> str:
    """One line for the job's events: exact match and key facts, base → tuned."""
    def share(figures: dict, key: str, count: str) -> str:
        value = figures[key]
        return "n/a" if value is None else f"{round(value * figures[count])}/{figures[count]}"

    base, tuned = quality["base"], quality["tuned"]
    line = (f"Answers to {quality['answered']} held-out prompts: exact match {share(base, 'exact_match', 'answers')} "
            f"→ {share(tuned, 'exact_match', 'answers')}; all key facts stated "
            f"{share(base, 'key_facts', 'answers_with_facts')} → {share(tuned, 'key_facts', 'answers_with_facts')} "
            f"(base → tuned, {quality['seconds']:.0f} s).")
    general = quality.get("general")
    if general:
        line += (f" General questions outside the domain ({general['answered']}, built in): all key facts stated "
                 f"{share(general['base'], 'key_facts', 'answers_with_facts')} → "
                 f"{share(general['tuned'], 'key_facts', 'answers_with_facts')}.")
    return line


def answerer(spec, tokenizer, valid_examples: list[Example], train_seconds: float, hooks: TrainingHooks):
    """`answer_side_by_side` bound to the job's fixed sample, or None when there is nothing to answer."""
    prompts = sample_prompts(valid_examples, spec.answer_samples, spec.seed)
    if not prompts:
        return None
    return partial(_answer_or_warn, hooks=hooks, tokenizer=tokenizer, prompts=prompts,
                   general=general_prompts(spec.general_samples), max_new_tokens=spec.answer_max_new_tokens,
                   budget_seconds=answer_budget_seconds(train_seconds))


def _answer_or_warn(model, *, hooks: TrainingHooks, tokenizer, prompts: list[HeldOutPrompt],
                    general: list[HeldOutPrompt], max_new_tokens: int, budget_seconds: float) -> dict | None:
    """The answers report on a trained adapter; failing to generate them (an architecture's `generate`, GPU memory)
    is a warning, never a failed job nor an out-of-memory retry of its training.

    The held-out sample gets its share of the time budget by its count of prompts, then the built-in general
    questions what is left; each answers at least its first batch, so a slow machine still shows both. The general
    figures go to `quality["general"]` and their rows, marked `part: general`, after the held-out ones."""
    try:
        share = len(prompts) / (len(prompts) + len(general))
        answered = answer_side_by_side(model, tokenizer, prompts, max_new_tokens, budget_seconds * share)
        answered["answers"] = [{**row, "part": "held_out"} for row in answered["answers"]]
        if general:
            left = budget_seconds - answered["quality"]["seconds"]
            extra = answer_side_by_side(model, tokenizer, general, min(max_new_tokens, GENERAL_MAX_NEW_TOKENS), left)
            answered["quality"]["general"] = extra["quality"]
            answered["answers"] += [{**row, "part": "general"} for row in extra["answers"]]
        return answered
    except Exception as exc:
        hooks.event("warn", f"Answers to held-out prompts were skipped: {type(exc).__name__}: {exc}"[:500])
        return None


def report_answers(quality: dict, step: int, hooks: TrainingHooks) -> None:
    """The figures in the job's events: a line to read, and a metrics event beside the loss metrics."""
    hooks.event("info", quality_message(quality))
    if hooks.on_metrics:
        figures = {f"{prefix}{key}": quality[side][key] for side, prefix in (("tuned", ""), ("base", "base_"))
                   for key in ("exact_match", "key_facts", "fact_recall") if quality[side][key] is not None}
        hooks.on_metrics({"step": step, **figures})
