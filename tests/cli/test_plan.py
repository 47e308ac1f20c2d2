"""`lorajobs plan` as an operator runs it: from a bare config.json or a catalogue model, as a table or JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA_2_13B = {**LLAMA_2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
GPUS = ("--gpu-classes", "gpu-24g,gpu-48g,gpu-80g")


def lorajobs_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_a_bare_config_gets_a_table_with_counts_fit_and_duration(tmp_path):
    config = write_config(tmp_path / "Llama-2-7b-hf", LLAMA_2_7B)
    result = lorajobs_plan("--config", str(config), "--quantization", "none", "--r", "8", "--target-modules",
                           "q_proj,v_proj", "--max-seq-length", "512", "--examples", "2000", "--mean-tokens", "300",
                           *GPUS)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Llama-2-7b-hf (llama): 4,194,304 trainable of 6,742,609,920 parameters (0.0622 %)" in out
    # 2,000 examples and general replay's 64 answers (96 tokens each, planned), in batches of 16
    assert ("LoRA, 16-bit base (bf16 or fp32 on a CPU, as measured); max_seq_length 512, batch 16, 3 epochs of "
            "2,000 examples and up to 64 replayed general answers, 1,818,432 tokens, 387 steps") in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("gpu-")}
    assert set(rows) == {"gpu-24g", "gpu-48g", "gpu-80g"}
    assert rows["gpu-24g"][2] == "yes" and rows["gpu-24g"][-1] in ("min", "h")  # a duration, e.g. "38.2 min"
    assert "Smallest class that fits: gpu-24g" in out

    # The same as plain text, which is never replayed: 2,000 rows alone, 3 × ⌈2,000 / 16⌉ steps
    text = lorajobs_plan("--config", str(config), "--quantization", "none", "--r", "8", "--target-modules",
                         "q_proj,v_proj", "--max-seq-length", "512", "--examples", "2000", "--mean-tokens", "300",
                         "--text", *GPUS)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "3 epochs of 2,000 examples, 1,800,000 tokens, 375 steps" in text.stdout
    assert "General replay" not in text.stdout


def test_json_says_13b_in_bf16_needs_the_48_gb_class(tmp_path):
    config = write_config(tmp_path / "13b", LLAMA_2_13B)
    result = lorajobs_plan("--config", str(config), "--quantization", "none", "--max-seq-length", "512", "--json",
                           *GPUS)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads(result.stdout)
    assert plan["object"] == "fine_tuning.job.plan"
    assert [c["fits"] for c in plan["classes"]] == [False, True, True]
    assert plan["smallest_fitting_class"] == "gpu-48g"
    assert plan["classes"][0]["memory"]["full_precision_weights"] > 26e9


def test_a_catalogue_model_is_planned_from_its_folder(tmp_path):
    write_config(tmp_path / "models" / "meta-llama" / "Llama-2-7b-hf", LLAMA_2_7B)
    found = lorajobs_plan("--model", "meta-llama/Llama-2-7b-hf", "--models-dir", str(tmp_path / "models"),
                          "--json", *GPUS)
    assert found.returncode == 0, found.stdout + found.stderr
    plan = json.loads(found.stdout)
    # quantization `auto`: the 16-bit base fits a 48 GB card with room (a 24 GB one only just), so LoRA over it
    assert plan["model"] == "meta-llama/Llama-2-7b-hf" and plan["quantization"] == "none"
    assert plan["notes"][0].startswith("quantization 'auto' chose 'none' (LoRA on the 16-bit base): it fits gpu-48g")
    # on 16 GB cards the 7B's 13.5 GB of 16-bit weights leave too little: 4 bits
    small = lorajobs_plan("--model", "meta-llama/Llama-2-7b-hf", "--models-dir", str(tmp_path / "models"),
                          "--gpu-classes", "card-16g:15.5", "--max-seq-length", "2048")
    assert small.returncode == 0, small.stdout + small.stderr
    assert "QLoRA nf4 + double quant;" in small.stdout
    assert "quantization 'auto' chose 'nf4' (QLoRA): the 16-bit base fits no configured class with 15 % of its memory to spare." in small.stdout
    missing = lorajobs_plan("--model", "nobody/nothing", "--models-dir", str(tmp_path / "models"))
    assert missing.returncode == 1 and "not in the catalogue" in missing.stdout


def test_mistakes_are_told_plainly(tmp_path):
    config = write_config(tmp_path / "7b", LLAMA_2_7B)
    unknown_layer = lorajobs_plan("--config", str(config), "--target-modules", "c_attn")
    assert unknown_layer.returncode == 1 and "q_proj" in unknown_layer.stdout
    bad_batch = lorajobs_plan("--config", str(config), "--batch-size", "8", "--micro-batch-size", "3")
    assert bad_batch.returncode == 1 and "micro_batch_size" in bad_batch.stdout
    bad_classes = lorajobs_plan("--config", str(config), "--gpu-classes", "mystery")
    assert bad_classes.returncode == 1 and "mystery" in bad_classes.stdout
