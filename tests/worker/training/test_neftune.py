"""NEFTune's noise is scaled by each example's own length, whether the batch is packed or padded."""

import math

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from worker.training.neftune import ExampleNoise, token_lengths

WIDTH, ALPHA = 64, 5.0
LENGTHS = (3, 12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    return LlamaForCausalLM(config)


def features():
    return [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in LENGTHS]


def noise_of(model, batch, training=True):
    """What the hooks added to the input embeddings in one forward of `batch`."""
    seen = []
    noise = ExampleNoise(model, ALPHA)
    capture = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model.train(training)
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        capture.remove()
        noise.remove()
    return seen[0] - model.get_input_embeddings()(batch["input_ids"]).detach()


def bound(length):
    return ALPHA / math.sqrt(length * WIDTH)


def test_lengths_of_packed_and_padded_rows():
    packed = token_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), None, (1, 6))
    assert packed.flatten().tolist() == [3, 3, 3, 2, 2, 1]
    with_mask = token_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.ones(1, 6, dtype=torch.long), (1, 6))
    assert with_mask.flatten().tolist() == [3, 3, 3, 2, 2, 1]  # a packing collator that also gives a mask of ones
    padded = token_lengths(None, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), (2, 4))
    assert padded[:, :, 0].tolist() == [[2, 2, 2, 2], [4, 4, 4, 4]]


def test_each_packed_example_gets_the_noise_of_its_own_length(model):
    batch = DataCollatorWithFlattening(return_tensors="pt")(features())
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(LENGTHS))
    added = noise_of(model, batch)[0].abs()
    short, long = added[:LENGTHS[0]], added[LENGTHS[0]:]
    # Uniform in ±bound: every value inside, the largest of 192 or 768 values close to it.
    assert short.max() <= bound(3) and short.max() > 0.9 * bound(3)
    assert long.max() <= bound(12) and long.max() > 0.9 * bound(12)
    # transformers' own hook would give both the packed row's bound, α / √(15 d).
    assert short.max() > 1.5 * bound(sum(LENGTHS))


def test_a_padded_row_is_scaled_by_its_real_tokens_not_its_padding(model):
    rows = features()
    width = max(LENGTHS)
    batch = {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
             "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in LENGTHS])}
    added = noise_of(model, batch).abs()
    assert added[0].max() <= bound(3) and added[0, :3].max() > 0.9 * bound(3)
    assert added[1].max() <= bound(12) and added[1].max() > 0.9 * bound(12)


def test_no_noise_in_eval_mode_nor_once_removed(model):
    batch = DataCollatorWithFlattening(return_tensors="pt")(features())
    assert noise_of(model, batch, training=False).abs().max() == 0
    model.train()
    with torch.no_grad():
        out = model.get_input_embeddings()(batch["input_ids"])  # hooks removed by noise_of
    assert torch.equal(out, model.get_input_embeddings()(batch["input_ids"]))
