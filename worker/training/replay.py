"""General replay: the base's own answers to built-in general prompts, trained beside the team's data.

Tuning on a few hundred chats of one domain teaches its manner everywhere: measured on the facts set, the adapters
answered general questions in the catalogue's style with wrong numbers ("A week has 365 days.") where the base was
right (docs/benchmarks.md, "Quality"). Training also on what the base itself answers outside the domain holds those
answers where they were; a form of self-distillation. Only finished answers are replayed: one cut at the token bound
would teach ending mid-sentence. The prompts (core/general.py `REPLAY_PROMPTS`) are none of the general questions
asked at the end of the job, which measure what survived.
"""

import time
from dataclasses import dataclass

from core.datasets.formats import Example, Turn
from core.general import REPLAY_PROMPTS
from worker.training.answers import GENERATION_BATCH, HeldOutPrompt, generate_finished

REPLAY_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Replay:
    """The replayed chats, and what generating them took."""

    examples: list[Example]
    asked: int
    seconds: float

    def message(self) -> str:
        unfinished = self.asked - len(self.examples)
        left_out = f"; {unfinished} unfinished within {REPLAY_MAX_NEW_TOKENS} tokens left out" if unfinished else ""
        return (f"General replay: the base answered {self.asked} built-in general prompts in {self.seconds:.0f} s; "
                f"{len(self.examples)} of its answers train beside the data, to keep its answering outside the "
                f"domain{left_out}.")


def is_chat_data(examples: list[Example]) -> bool:
    """Replay is chat turns: it joins chat data only (text data has no turns for it to match)."""
    return bool(examples) and all(example.kind == "chat" for example in examples)


def replay_examples(model, tokenizer, count: int) -> Replay:
    """The base `model`'s greedy answers to the first `count` replay prompts, as chats with the answer trained."""
    start = time.monotonic()
    was_training = model.training
    model.eval()
    prompts = [HeldOutPrompt([{"role": "user", "content": prompt}], "") for prompt in REPLAY_PROMPTS[:count]]
    examples = []
    try:
        for at in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[at:at + GENERATION_BATCH]
            for prompt, (answer, finished) in zip(batch, generate_finished(model, tokenizer, batch,
                                                                            REPLAY_MAX_NEW_TOKENS)):
                if finished and answer:
                    examples.append(Example("chat", (Turn("user", prompt.prompt, False),
                                                     Turn("assistant", answer, True))))
    finally:
        model.train(was_training)
    return Replay(examples, len(prompts), round(time.monotonic() - start, 2))
