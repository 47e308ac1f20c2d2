"""The training core's only window to the outside: progress, metrics, checkpoints, events, cooperative cancel.

Torch-free, so a caller can build hooks without importing the training libraries.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class TrainingHooks:
    """Optional callables the caller (a Celery task, the CLI, a test) passes to `train`."""

    on_progress: Callable[[dict], None] | None = None
    on_metrics: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[int, Path, dict], None] | None = None
    on_event: Callable[[str, str], None] | None = None
    # Asked after every step: a truthy answer stops training there with a checkpoint; a string says why
    # ("Pause requested"), for the event that records it.
    should_stop: Callable[[], bool | str | None] | None = None
    on_parameters: Callable[[dict], None] | None = None  # trainable/total counts, once the adapter is attached

    def event(self, level: str, message: str) -> None:
        if self.on_event:
            self.on_event(level, message)
