"""Projecting only the labelled positions onto the vocabulary changes the cost, not the maths: the same loss and the
same gradients as the model's full-logits loss, packed or padded, on every family."""

import pytest
import torch

from tests.conftest import FAMILY_ORG
from tests.helpers.families import FAMILIES, loss_and_grads, sample_rows
from tests.worker.conftest import tiny_spec
from worker.training import load_tokenizer
from worker.training.data import LabelledLogitsOnly, make_collator, training_collator
from worker.training.model import attach_adapter, load_base_model


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_labelled_logits_only_gives_the_full_loss_and_gradients(family_catalogue, name, packing):
    model_id = f"{FAMILY_ORG}/{name}"
    tokenizer = load_tokenizer(model_id, family_catalogue)
    spec = tiny_spec(model=model_id, lora={"r": 4, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(spec, family_catalogue, "cpu"), spec)
    rows = sample_rows(tokenizer)
    collator = make_collator(packing, tokenizer)
    assert isinstance(training_collator(collator, model), LabelledLogitsOnly)  # every family's forward takes the mask

    full_batch = collator([dict(r) for r in rows])
    selective_batch = LabelledLogitsOnly(collator)([dict(r) for r in rows])
    kept = int(selective_batch["logits_to_keep"].sum())
    assert 0 < kept < full_batch["input_ids"].numel()  # prompts are not projected
    assert kept == int((full_batch["labels"][:, 1:] != -100).sum())

    full_loss, full_grads = loss_and_grads(model, full_batch)
    selective_loss, selective_grads = loss_and_grads(model, selective_batch)
    assert selective_loss == pytest.approx(full_loss, rel=1e-5)
    for full, selective in zip(full_grads, selective_grads, strict=True):
        torch.testing.assert_close(selective, full, rtol=1e-4, atol=1e-6)
