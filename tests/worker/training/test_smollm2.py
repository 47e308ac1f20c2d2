"""One real model: a short QLoRA run of SmolLM2 on the retail-support demo data."""

import json
from pathlib import Path

import pytest

from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import write_jsonl
from worker.catalogue import SMOLLM2_ID
from worker.training import train

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo"


def demo_subset(tmp_path: Path, n_train: int, n_valid: int) -> tuple[Path, Path]:
    """The first chats of the demo dataset, or templated stand-ins while it is not in the tree."""
    if (DEMO / "train.jsonl").is_file() and (DEMO / "valid.jsonl").is_file():
        def head(path: Path, n: int) -> list[dict]:
            return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()][:n]

        train_records, valid_records = head(DEMO / "train.jsonl", n_train), head(DEMO / "valid.jsonl", n_valid)
    else:
        train_records, valid_records = retail_chat_records(n_train), retail_chat_records(n_valid, offset=500)
    return write_jsonl(tmp_path / "train.jsonl", train_records), write_jsonl(tmp_path / "valid.jsonl", valid_records)


@pytest.mark.slow
def test_a_short_qlora_run_lowers_held_out_loss_and_the_answer_ends_with_eos(smollm2_models_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from core.spec import JobSpec
    from worker.training.model import load_adapter_model

    train_file, valid_file = demo_subset(tmp_path, n_train=32, n_valid=8)
    spec = JobSpec(model=SMOLLM2_ID, quantization="nf4", n_epochs=1, batch_size=8, learning_rate=2e-3,
                   max_seq_length=256, lora={"r": 8})
    result = train(spec, train_file, valid_file, tmp_path / "out", models_dir=smollm2_models_dir)
    assert result.status == "succeeded" and result.steps == 4
    assert result.final_eval["loss"] < result.baseline_eval["loss"]
    served = result.served_eval  # where a user serves it: the full-precision base, or merged
    assert served["adapter_on_full_precision_base"]["loss"] < result.baseline_eval["loss"]
    assert served["merge_base"] in ("full_precision", "dequantized_4bit")

    tokenizer = AutoTokenizer.from_pretrained(smollm2_models_dir / SMOLLM2_ID)
    model = load_adapter_model(result.adapter_dir, smollm2_models_dir).eval()
    question = json.loads(valid_file.read_text().splitlines()[0])["messages"]
    prompt = tokenizer.apply_chat_template([m for m in question if m["role"] != "assistant"][:2],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=64, do_sample=False)
    assert output[0, -1].item() == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
