"""Evaluate: token-level loss and accuracy on validation rows, counting only trained tokens."""

from collections.abc import Iterator
from contextlib import contextmanager

from worker.training.data import IGNORE_INDEX


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block, then back in the mode it was in, even when the block fails:
    evaluation, answers and replay run mid-training, and the Trainer goes on from their model."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_model(model, rows: list[dict], collator, micro_batch_size: int) -> dict | None:
    """Mean cross-entropy and next-token accuracy over every trained validation token; None without rows."""
    import torch
    import torch.nn.functional as F

    if not rows:
        return None
    device = next(p for p in model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(rows), micro_batch_size):
            batch = collator(rows[start:start + micro_batch_size])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float()
            logits, targets = logits[:, :-1], labels[:, 1:]
            mask = targets != IGNORE_INDEX
            total_loss += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == targets[mask]).sum().item()
            count += int(mask.sum())
    return {"loss": total_loss / count, "token_accuracy": correct / count}
