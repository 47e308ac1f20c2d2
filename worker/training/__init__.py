"""The training core: base model + dataset + job spec -> LoRA/QLoRA adapter (DESIGN.md, decision 4).

Importing this package loads no training library; each function imports what it needs.
"""

from worker.training.artifacts import TrainingResult
from worker.training.data import tokenize_example
from worker.training.hooks import TrainingHooks
from worker.training.model import load_tokenizer, merge_adapter, to_bnb_config, to_lora_config
from worker.training.pipeline import train

__all__ = [
    "TrainingHooks",
    "TrainingResult",
    "load_tokenizer",
    "merge_adapter",
    "to_bnb_config",
    "to_lora_config",
    "tokenize_example",
    "train",
]
