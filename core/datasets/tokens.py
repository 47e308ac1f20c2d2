"""Token statistics of a validated dataset for one base model, with the tokenizer kept outside.

The worker owns tokenizers (core/ is torch-free), so it passes a `count` function that turns one
normalised example into a `TokenCount` the way its training step would tokenize and truncate it.
"""

import math
from array import array
from collections.abc import Callable, Iterable
from typing import NamedTuple

from core.datasets.formats import Example
from core.datasets.report import TokenStats

LISTED_TRUNCATED_LINES = 10


class TokenCount(NamedTuple):
    tokens: int  # the whole example, before truncation
    trainable_after_truncation: int  # trained tokens left within max_seq_length
    truncated: bool


CountTokens = Callable[[Example], TokenCount | tuple[int, int, bool]]


def token_statistics(
    examples: Iterable[tuple[int, Example]], *, model: str, max_seq_length: int, count: CountTokens
) -> TokenStats:
    """Count, total, min/mean/p95/max and truncation over `(line, example)` pairs (`iter_examples`' output)."""
    lengths = array("Q")  # 8 bytes an example: p95 needs them all, a million examples is 8 MB
    truncated_lines: list[int] = []
    truncated = no_trainable = 0
    for line, example in examples:
        counted = TokenCount(*count(example))
        lengths.append(counted.tokens)
        if counted.truncated:
            truncated += 1
            if len(truncated_lines) < LISTED_TRUNCATED_LINES:
                truncated_lines.append(line)
        if counted.trainable_after_truncation == 0:
            no_trainable += 1
    return TokenStats(
        model=model,
        max_seq_length=max_seq_length,
        **length_summary(lengths),
        truncated=truncated,
        no_trainable_after_truncation=no_trainable,
        truncated_lines=truncated_lines,
    )


def length_summary(lengths: Iterable[int]) -> dict:
    """Count, total, min, mean, p95 and max of example lengths: what the planner reads of a dataset."""
    ordered = sorted(lengths)
    return {"count": len(ordered), "total": sum(ordered), "min": ordered[0] if ordered else 0,
            "mean": round(sum(ordered) / len(ordered), 2) if ordered else 0.0, "p95": _nearest_rank(ordered, 0.95),
            "max": ordered[-1] if ordered else 0}


def _nearest_rank(ordered: list[int], fraction: float) -> int:
    """The smallest value with at least `fraction` of the values at or below it."""
    if not ordered:
        return 0
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]
