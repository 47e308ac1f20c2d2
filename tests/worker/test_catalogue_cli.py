"""The model catalogue as the worker sees it, and the `models` and `train` commands."""

import argparse
import json
import subprocess
import sys

import pytest

from core.errors import ModelNotFound
from tests.worker.conftest import TINY, write_jsonl
from tests.helpers.tiny_model import retail_chat_records
from worker.catalogue import model_source


def run_cli(*argv: str) -> int:
    """The commands as the `lorajobs` console script registers them."""
    from cli import models, train

    parser = argparse.ArgumentParser(prog="lorajobs")
    sub = parser.add_subparsers(dest="command", required=True)
    models.register(sub)
    train.register(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_a_catalogue_id_loads_from_its_folder_and_a_hub_id_only_online(models_dir, monkeypatch):
    assert model_source(models_dir, TINY) == str(models_dir / TINY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="tiny/llama"):
        model_source(models_dir, "meta-llama/Llama-3.2-1B")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert model_source(models_dir, "meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def test_models_add_then_list(models_dir, tmp_path, capsys):
    catalogue = tmp_path / "catalogue"
    assert run_cli("models", "add", "acme/tiny", str(models_dir / TINY), "--models-dir", str(catalogue)) == 0
    assert run_cli("models", "list", "--models-dir", str(catalogue)) == 0
    assert "acme/tiny\tLlamaForCausalLM" in capsys.readouterr().out
    assert run_cli("models", "add", "acme/tiny", str(models_dir / TINY), "--models-dir", str(catalogue)) == 1
    assert "already in the catalogue" in capsys.readouterr().out


def test_train_command_writes_the_adapter_and_result(models_dir, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": TINY, "quantization": "none", "n_epochs": 1, "batch_size": 4}))
    data = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(12))
    out = tmp_path / "out"
    assert run_cli("train", "--spec", str(spec), "--train", str(data), "--out", str(out), "--models-dir", str(models_dir)) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "succeeded" and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert '"status": "succeeded"' in capsys.readouterr().out


def test_train_command_names_the_fields_of_an_invalid_spec(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": TINY, "lora": {"r": 0}, "epochs": 3}))
    with pytest.raises(SystemExit, match=r"lora\.r: .*; epochs: Extra inputs are not permitted"):
        run_cli("train", "--spec", str(spec), "--train", "x.jsonl", "--out", str(tmp_path / "out"))


def test_importing_the_core_and_its_commands_loads_no_training_library():
    code = ("import sys, worker.training, cli.train, cli.models; "
            "print(sorted({'torch', 'transformers', 'peft', 'bitsandbytes'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
