"""Attention one example at a time over packed rows changes the cost, not the maths: the same loss and gradients as
SDPA over the dense block-diagonal mask, on every family, and the training run uses it."""

import pytest
import torch

from tests.conftest import FAMILY_ORG
from tests.helpers.families import FAMILIES, loss_and_grads, sample_rows
from tests.worker.conftest import tiny_spec
from worker.training import load_tokenizer
from worker.training.attention import BOUNDARY_KEY, PACKED_SDPA, _window_mask, add_boundaries, packed_sdpa_forward
from worker.training.data import LabelledLogitsOnly, make_collator, training_collator
from worker.training.model import attach_adapter, load_base_model


def test_boundaries_are_where_positions_restart():
    batch = add_boundaries({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])})
    assert batch[BOUNDARY_KEY].tolist() == [0, 3, 5, 9]
    padded = {"position_ids": torch.tensor([[0, 1], [0, 1]])}
    assert BOUNDARY_KEY not in add_boundaries(padded)  # two rows: not a packed batch


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_attention_gives_the_dense_mask_loss_and_gradients(family_catalogue, name):
    model_id = f"{FAMILY_ORG}/{name}"
    tokenizer = load_tokenizer(model_id, family_catalogue)
    spec = tiny_spec(model=model_id, lora={"r": 4, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(spec, family_catalogue, "cpu"), spec)
    collator = make_collator(True, tokenizer)
    rows = sample_rows(tokenizer)
    dense_loss, dense_grads = loss_and_grads(model, LabelledLogitsOnly(collator)([dict(r) for r in rows]))

    seen = []
    from transformers import AttentionInterface

    from worker.training.attention import register, use_packed_attention

    register()
    AttentionInterface.register(PACKED_SDPA, lambda *a, **kw: seen.append(BOUNDARY_KEY in kw) or packed_sdpa_forward(*a, **kw))
    try:
        switched = use_packed_attention(model)
        batch = training_collator(collator, model)([dict(r) for r in rows])
        packed_loss, packed_grads = loss_and_grads(model, batch)
    finally:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    if switched:
        assert seen and all(seen)  # every attention layer got the boundaries: no dense mask was used
        assert batch[BOUNDARY_KEY].numel() == len(rows) + 1
    assert packed_loss == pytest.approx(dense_loss, rel=1e-5)
    for dense, packed in zip(dense_grads, packed_grads, strict=True):
        torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-6)


def test_an_example_longer_than_the_sliding_window_is_windowed():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))

    class Layer(torch.nn.Module):
        sliding_window = 3

    out, _ = packed_sdpa_forward(Layer(), q, k, v, None, **{BOUNDARY_KEY: torch.tensor([0, 2, 7], dtype=torch.int32)})
    reference = []
    for start, end in ((0, 2), (2, 7)):
        mask = _window_mask(end - start, 3, "cpu")
        reference.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask).transpose(1, 2))
    torch.testing.assert_close(out, torch.cat(reference, dim=1))


class _SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records the dtype and length of every query that reaches PyTorch's SDPA."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((str(args[0].dtype), args[0].shape[-2]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_bf16_model_attends_in_float32_in_examples_shorter_than_its_measured_limit(family_catalogue, family):
    """The examples under `fp32_below` tokens attend in float32, the others in bf16, and the loss is the same."""
    model_id = f"{FAMILY_ORG}/{family}"
    tokenizer = load_tokenizer(model_id, family_catalogue)
    spec = tiny_spec(model=model_id, lora={"r": 4, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(spec, family_catalogue, "cpu").to(torch.bfloat16), spec)
    rows = sample_rows(tokenizer)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert lengths[0] < lengths[-1]
    from worker.training.attention import attend_in_float32_below, use_packed_attention

    assert use_packed_attention(model.get_base_model())
    collator = training_collator(make_collator(True, tokenizer), model)
    results = {}
    for limit in (0, lengths[-1], 10_000):  # none, all but the longest, every example
        attend_in_float32_below(model.get_base_model(), limit)
        with _SdpaCalls() as sdpa:
            results[limit] = loss_and_grads(model, collator([dict(r) for r in rows]))
        expected = [(str(torch.float32 if n < limit else torch.bfloat16), n) for n in lengths]
        assert sorted(sdpa.calls) == sorted(expected * model.config.num_hidden_layers)
    for limit in (lengths[-1], 10_000):
        assert results[limit][0] == pytest.approx(results[0][0], rel=2e-2)
