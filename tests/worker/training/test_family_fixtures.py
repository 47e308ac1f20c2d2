"""The family fixtures build real-vocabulary random models that load offline and render every sample chat."""

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from tests.conftest import FAMILY_ORG
from tests.helpers.families import FAMILIES, SAMPLE_CHATS


@pytest.fixture(scope="session")
def family_models(family_catalogue) -> Path:
    return family_catalogue / FAMILY_ORG


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_with_its_token_ids(family_models, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    family, folder = FAMILIES[name], family_models / name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = model.config

    assert tokenizer.is_fast
    assert len(tokenizer) <= config.vocab_size
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.bos_token_id in (None, config.bos_token_id)
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == list(family.eos_token_ids)
    assert config.eos_token_id in family.eos_token_ids
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    assert set(family.eos_token_ids) <= special_ids

    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_renders_every_sample_chat(family_models, name):
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(family_models / name)
    if not family.has_chat_template:
        assert tokenizer.chat_template is None
        return
    for chat_name, messages in SAMPLE_CHATS.items():
        has_system = any(m["role"] == "system" for m in messages)
        if name == "gemma" and has_system:
            with pytest.raises(TemplateError, match="System role not supported"):
                tokenizer.apply_chat_template(messages, tokenize=False)
            continue
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert messages[-1]["content"].strip() in text, chat_name
