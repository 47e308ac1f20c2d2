"""The four dataset formats and their one normalised shape, shared by validation and training.

A record is one JSON object of a JSONL line. `detect_format` names its format; `to_example`
turns it into an `Example`: chat turns (chat, prompt/completion, instruction) or plain text.
"""

from dataclasses import dataclass, field
from typing import Literal

Format = Literal["chat", "prompt_completion", "instruction", "text"]
FORMATS: tuple[Format, ...] = ("chat", "prompt_completion", "instruction", "text")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    trained: bool  # True only for assistant turns that carry loss (weight 1, the default)


@dataclass(frozen=True)
class Example:
    kind: Literal["chat", "text"]
    turns: tuple[Turn, ...] = field(default_factory=tuple)
    text: str = ""


def detect_format(record: dict) -> Format | None:
    """The format a record's keys announce, or None when they fit none."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def to_example(record: dict, fmt: Format) -> Example:
    """Normalise a record that validation has accepted."""
    if fmt == "chat":
        turns = tuple(
            Turn(m["role"], m["content"], m["role"] == "assistant" and m.get("weight", 1) == 1)
            for m in record["messages"]
        )
        return Example("chat", turns)
    if fmt == "prompt_completion":
        return Example("chat", (Turn("user", record["prompt"], False), Turn("assistant", record["completion"], True)))
    if fmt == "instruction":
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return Example("chat", (Turn("user", prompt, False), Turn("assistant", record["output"], True)))
    return Example("text", text=record["text"])
