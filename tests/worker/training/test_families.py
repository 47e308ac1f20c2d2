"""Every model family trains correctly: labels equal the whole-conversation tokenization, presets resolve,
a short run lowers the loss, and the adapter reloads and merges (real vocabularies, tiny random weights)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.architectures import resolve_targets
from core.datasets.formats import to_example
from tests.conftest import FAMILY_ORG
from tests.helpers.families import FAMILIES, SAMPLE_CHATS
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import tiny_spec, write_jsonl
from worker.training import load_tokenizer, tokenize_example, train
from worker.training.data import IGNORE_INDEX, _fold_system, render_example

ROOT = Path(__file__).resolve().parents[3]
QLORA_FAMILIES = ("phi3", "llama3")


def model_id(name: str) -> str:
    return f"{FAMILY_ORG}/{name}"


@pytest.fixture(scope="module")
def tokenizers(family_catalogue):
    return {name: load_tokenizer(model_id(name), family_catalogue) for name in FAMILIES}


def reference_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What inference feeds the model: the template applied to the whole conversation, tokenized by transformers."""
    from jinja2 import TemplateError

    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    except TemplateError:  # Gemma refuses a system role: inference folds it into the first user turn, as we do
        return list(tokenizer.apply_chat_template(_fold_system(messages), tokenize=True)["input_ids"])


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def squeeze(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("chat", SAMPLE_CHATS)
@pytest.mark.parametrize("name", FAMILIES)
def test_labels_are_the_whole_conversation_tokenized_once(tokenizers, name, chat):
    tokenizer, messages = tokenizers[name], SAMPLE_CHATS[chat]
    example = to_example({"messages": messages}, "chat")
    ids, labels = tokenize_example(example, tokenizer, 10**6, train_on_inputs=False)

    assert ids == reference_ids(tokenizer, messages)  # the trained ids are the ids inference sees
    assert not render_example(example, tokenizer).append_eos  # every template here closes its turns itself
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(answers)
    end_of_turn = set(FAMILIES[name].eos_token_ids) | {tokenizer.eos_token_id}
    for run, answer in zip(runs, answers):
        assert run[-1] in end_of_turn, tokenizer.convert_ids_to_tokens(run[-3:])  # the model learns to stop
        assert squeeze(answer.rsplit("</think>", 1)[-1]) in squeeze(tokenizer.decode(run))
    prompts = [m["content"] for m in messages if m["role"] != "assistant"]
    untrained = squeeze(tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX]))
    assert not any(squeeze(p) in squeeze(tokenizer.decode(sum(runs, []))) for p in prompts)
    if name != "phi3":  # Phi-3's template drops system messages
        assert all(squeeze(p) in untrained for p in prompts)


def test_base_models_without_a_template_get_the_plain_one_with_their_own_bos_and_eos(tokenizers):
    llama2, falcon = tokenizers["llama2"], tokenizers["falcon"]
    assert llama2.lorajobs_chat_template == falcon.lorajobs_chat_template == "plain"
    messages = SAMPLE_CHATS["system"]
    text = llama2.apply_chat_template(messages, tokenize=False)
    assert text == ("<s>You are the support assistant of an online shop.\n\n### User:\nCan I return a jacket after "
                    "20 days?\n\n### Assistant:\nYes: returns are accepted within 30 days with the receipt.</s>\n\n")
    assert falcon.apply_chat_template(messages, tokenize=False).startswith("You are")  # Falcon adds no BOS
    assert tokenizers["qwen2"].lorajobs_chat_template == "model"


@pytest.mark.parametrize("name", FAMILIES)
def test_presets_resolve_to_layers_the_model_has(family_catalogue, name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(family_catalogue / model_id(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    for preset in ("attention-qv", "attention", "all-linear"):
        targets = resolve_targets(config.to_dict(), preset)
        assert targets.names and set(targets.names) <= linear, (preset, targets.names, linear)
    assert set(resolve_targets(config.to_dict(), "all-linear").names) == linear


@pytest.fixture(scope="module")
def family_runs(family_catalogue, tmp_path_factory):
    """A short LoRA run per family on chats with system prompts (QLoRA for Phi-3's fused layers and Llama-3)."""
    root = tmp_path_factory.mktemp("family-runs")
    train_file = write_jsonl(root / "train.jsonl", retail_chat_records(16))
    valid_file = write_jsonl(root / "valid.jsonl", retail_chat_records(4, offset=40))
    runs = {}
    for name in FAMILIES:
        quantization = "nf4" if name in QLORA_FAMILIES else "none"
        spec = tiny_spec(model=model_id(name), quantization=quantization, lora={"r": 4, "target_modules": "all-linear"},
                         max_seq_length=96)
        runs[name] = train(spec, train_file, valid_file, root / name, models_dir=family_catalogue)
    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_a_short_run_lowers_the_loss_and_counts_parameters_as_peft(family_runs, name):
    result = family_runs[name]
    assert result.status == "succeeded" and result.final_eval["loss"] < result.baseline_eval["loss"]
    assert result.chat_template == ("model" if FAMILIES[name].has_chat_template else "plain")
    assert (result.adapter_dir / "chat_template.jinja").is_file()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model_id(name)
    assert 0 < result.parameters["trainable_parameters"] < result.parameters["total_parameters"]
    if name in QLORA_FAMILIES:
        assert result.served_eval["merge_base"] in ("full_precision", "dequantized_4bit")


def test_every_adapter_reloads_in_a_fresh_process_and_its_merge_agrees(family_runs, family_catalogue, tmp_path):
    """One fresh interpreter loads every family's adapter with plain PEFT and compares it with its merged model."""
    jobs = {name: str(result.adapter_dir) for name, result in family_runs.items()}
    script = f"""
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from worker.training.model import merge_adapter
out = {{}}
for name, adapter in json.loads(sys.argv[1]).items():
    base_dir = Path({str(family_catalogue)!r}) / {FAMILY_ORG!r} / name
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Where is my parcel 120?"}}],
                                        add_generation_prompt=True, tokenize=True, return_tensors="pt")["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    merged_dir = merge_adapter(Path(adapter), Path({str(tmp_path)!r}) / name, Path({str(family_catalogue)!r}))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        a, m = model(ids).logits, merged(ids).logits
    out[name] = {{"trainable": trainable, "max_diff": (a - m).abs().max().item()}}
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in family_runs.items():
        assert reloaded[name]["trainable"] == result.parameters["trainable_parameters"], name
        assert reloaded[name]["max_diff"] < 1e-4, name


def test_qlora_of_an_architecture_transformers_cannot_quantize_is_refused_not_trained_in_16_bit(
        family_catalogue, tmp_path):
    from core.errors import InvalidRequest

    data = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(8))
    with pytest.raises(InvalidRequest) as refused:
        train(tiny_spec(model=model_id("falcon"), quantization="nf4"), data, None, tmp_path / "out",
              models_dir=family_catalogue)
    assert refused.value.code == "quantization_unsupported" and refused.value.param == "quantization"
    assert "FalconLinear" in refused.value.message and "'none'" in refused.value.message
