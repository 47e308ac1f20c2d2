"""Model and adapter steps: the spec as LoraConfig / BitsAndBytesConfig, LoRA and QLoRA training, the 4-bit guard."""

import pytest
import torch

from tests.worker.conftest import TINY, tiny_spec
from worker.training import to_bnb_config, to_lora_config
from worker.training.data import make_collator, read_examples, tokenize_all
from worker.training.model import (
    QuantizedLayoutError,
    attach_adapter,
    check_4bit_layout,
    load_base_model,
)


@pytest.mark.parametrize(("preset", "model_type", "modules"), [
    ("attention-qv", "llama", {"q_proj", "v_proj"}),
    ("attention", "mistral", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("attention", "qwen2", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("attention", "gemma", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("attention-qv", "falcon", {"query_key_value"}),
    ("attention-qv", "phi3", {"qkv_proj"}),
    ("all-linear", "phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("attention-qv", "gpt_neox", {"query_key_value"}),
    ("attention-qv", "gpt2", {"c_attn"}),
    (["gate_proj", "up_proj"], "llama", {"gate_proj", "up_proj"}),
])
def test_target_module_presets_per_architecture(preset, model_type, modules):
    config = to_lora_config(tiny_spec(lora={"target_modules": preset}), {"model_type": model_type})
    assert set(config.target_modules) == modules


def test_lora_config_carries_the_spec():
    config = to_lora_config(tiny_spec(lora={"r": 4, "dropout": 0.0, "target_modules": "all-linear",
                                            "use_rslora": True, "use_dora": True}), {"model_type": "llama"})
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.use_rslora and config.use_dora
    assert config.modules_to_save is None and config.task_type == "CAUSAL_LM"


def test_bnb_config_is_none_for_plain_lora_and_4bit_otherwise():
    assert to_bnb_config(tiny_spec(quantization="none"), "cpu") is None
    config = to_bnb_config(tiny_spec(quantization="nf4"), "cpu")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    # The compute path's choice (worker/training/compute.py; the suite pins float32 for reproducible training).
    assert config.bnb_4bit_compute_dtype == torch.float32
    fp4 = to_bnb_config(tiny_spec(quantization="fp4", double_quant=False, compute_dtype="float32"), "cpu")
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.float32


def _train_steps(model, rows, spec, tokenizer, steps: int) -> None:
    """A few optimizer steps over `rows`, the way Trainer does them."""
    collator = make_collator(spec.packing, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**collator(rows[step * 4:(step + 1) * 4])).loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def rows(chat_files, tokenizer):
    return tokenize_all(read_examples(chat_files[0]), tokenizer, 128, False).rows


def test_lora_training_changes_adapter_weights_and_not_the_base(models_dir, tokenizer, rows):
    spec = tiny_spec()
    model = attach_adapter(load_base_model(spec, models_dir, "cpu"), spec)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train_steps(model, rows, spec, tokenizer, steps=3)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    lora = {name for name in before if "lora_" in name}
    assert lora and changed == lora


def test_qlora_trains_every_lora_parameter_and_the_guard_passes(models_dir, tokenizer, rows):
    import bitsandbytes as bnb

    from worker.training.evaluate import evaluate_model

    spec = tiny_spec(quantization="nf4")
    model = attach_adapter(load_base_model(spec, models_dir, "cpu"), spec)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # An evaluation mid-training must not repack the 4-bit weights (the pinned layout sees to it).
    evaluate_model(model, rows[:4], make_collator(True, tokenizer), 4)
    check_4bit_layout(model)
    _train_steps(model, rows, spec, tokenizer, steps=2)  # lora_B starts at zero: train so lora_A gets gradients
    model.zero_grad()
    model(**make_collator(True, tokenizer)(rows[8:12])).loss.backward()
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    check_4bit_layout(model)


def test_qlora_recomputes_activations_only_when_asked_with_the_same_loss_and_gradients(models_dir, tokenizer, rows):
    """4-bit bases train with or without recomputed activations (the plan decides); the numbers are the same."""
    spec = tiny_spec(quantization="nf4", lora={"r": 4, "target_modules": "all-linear", "dropout": 0.0})
    batch = make_collator(True, tokenizer)(rows[:4])
    found = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = attach_adapter(load_base_model(spec, models_dir, "cpu", gradient_checkpointing=checkpointing), spec)
        assert model.base_model.model.is_gradient_checkpointing is checkpointing
        for name, p in model.named_parameters():  # lora_B starts at zero: give it values so lora_A gets gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        model.train()  # recomputation happens only in training mode
        calls = []
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop before it returns
        loss = model(**batch).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass, or kept
        found[checkpointing] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (plain_loss, plain), (recomputed_loss, recomputed) = found[False], found[True]
    assert plain_loss == pytest.approx(recomputed_loss, rel=1e-6) and plain.keys() == recomputed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(grad, recomputed[name], rtol=1e-4, atol=1e-6)
    # and without a plan: never on the CPU
    assert not load_base_model(spec, models_dir, "cpu").is_gradient_checkpointing


def _cpu_repacks_4bit_weights() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return has_avx512bf16()


@pytest.mark.skipif(not _cpu_repacks_4bit_weights(),
                    reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
def test_the_guard_fails_loudly_when_an_inference_pass_repacked_4bit_weights(models_dir, tokenizer, rows):
    from transformers import AutoModelForCausalLM

    # Loaded without load_base_model's pinning: what a careless caller would do before training.
    model = AutoModelForCausalLM.from_pretrained(
        models_dir / TINY, quantization_config=to_bnb_config(tiny_spec(quantization="nf4"), "cpu"), device_map={"": "cpu"}
    ).eval()
    check_4bit_layout(model)
    with torch.no_grad():
        model(**make_collator(True, tokenizer)(rows[:2]))
    with pytest.raises(QuantizedLayoutError, match="repacked"):
        check_4bit_layout(model)
