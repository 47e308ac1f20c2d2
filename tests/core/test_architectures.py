"""The per-architecture registry resolves presets and refuses what serving engines or the model cannot take."""

import pytest

from core.architectures import ARCHITECTURES, check_quantization, resolve_targets
from core.errors import InvalidRequest

REQUIRED = ("llama", "mistral", "mixtral", "falcon", "gpt_neox", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
            "gemma3_text", "gpt2", "starcoder2")


def test_the_registry_covers_the_families_users_run():
    assert set(REQUIRED) <= set(ARCHITECTURES)
    for arch in ARCHITECTURES.values():
        assert set(arch.query_value) <= set(arch.attention) and arch.linear[: len(arch.attention)] == arch.attention


@pytest.mark.parametrize(("model_type", "preset", "names"), [
    ("mistral", "attention-qv", ["q_proj", "v_proj"]),
    ("falcon", "attention", ["query_key_value", "dense"]),
    ("phi3", "all-linear", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("mixtral", "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gpt2", "all-linear", ["c_attn", "c_proj", "c_fc"]),
])
def test_presets_resolve_per_architecture(model_type, preset, names):
    resolved = resolve_targets({"model_type": model_type}, preset)
    assert resolved.names == names and resolved.modules == names and not resolved.multimodal


def test_a_multimodal_checkpoint_adapts_only_its_language_model():
    config = {"model_type": "llava", "text_config": {"model_type": "mistral"}, "vision_config": {}}
    resolved = resolve_targets(config, "attention-qv")
    assert resolved.multimodal and resolved.model_type == "mistral"
    assert resolved.modules == r".*language_model.*\.(q_proj|v_proj)"
    import re

    assert re.fullmatch(resolved.modules, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(resolved.modules, "model.vision_tower.encoder.layers.0.self_attn.q_proj")


def test_an_unknown_architecture_falls_back_to_peft_for_what_peft_knows():
    assert resolve_targets({"model_type": "brandnew"}, "attention-qv").modules is None  # peft's default
    assert resolve_targets({"model_type": "brandnew"}, "all-linear").modules == "all-linear"
    assert resolve_targets({"model_type": "brandnew"}, ["wq", "wv"]).modules == ["wq", "wv"]
    with pytest.raises(InvalidRequest, match="'attention' is not known for model_type 'brandnew'"):
        resolve_targets({"model_type": "brandnew"}, "attention")


@pytest.mark.parametrize(("modules", "says"), [
    (["query_key_value"], "match no layer of this model (llama's linear layers: q_proj, k_proj, v_proj, o_proj, "
                          "gate_proj, up_proj, down_proj)"),
    (["q_proj", "lm_head"], "serving engines"),
    (["model.embed_tokens"], "serving engines"),
])
def test_explicit_lists_are_checked_against_the_architecture(modules, says):
    with pytest.raises(InvalidRequest) as refused:
        resolve_targets({"model_type": "llama"}, modules)
    assert refused.value.param == "lora.target_modules" and refused.value.code == "invalid_target_modules"
    assert says in refused.value.message


def test_4bit_is_refused_where_transformers_cannot_quantize_the_layers():
    check_quantization({"model_type": "falcon"}, "none")
    check_quantization({"model_type": "llama"}, "nf4")
    with pytest.raises(InvalidRequest) as refused:
        check_quantization({"model_type": "falcon"}, "nf4")
    assert refused.value.param == "quantization" and "FalconLinear" in refused.value.message
