"""The compute path: measured on this CPU by timing the layers training runs, forced by a setting, or the spec's."""

import pytest

from core.settings import get_settings
from tests.worker.conftest import tiny_spec
from worker.training import compute
from worker.training.compute import (
    MIN_GAIN,
    PLAIN_CANDIDATES,
    QUANTIZED_CANDIDATES,
    AttentionPath,
    ComputePath,
    attention_path,
    choose,
    compute_path,
    measured_attention_path,
    measured_cpu_path,
)


@pytest.fixture
def cpu_compute(monkeypatch):
    def force(value: str) -> None:
        monkeypatch.setenv("LORAJOBS_CPU_COMPUTE", value)
        get_settings.cache_clear()

    yield force
    get_settings.cache_clear()  # monkeypatch then restores the suite's pinned value


def test_float32_is_kept_unless_another_path_is_clearly_faster():
    assert choose({"float32": 1.0, "bf16-autocast": 0.9, "bfloat16": 1 / MIN_GAIN + 0.01}) == "float32"
    assert choose({"float32": 1.0, "bf16-autocast": 0.6, "bfloat16": 0.7}) == "bf16-autocast"
    assert choose({"float32": 1.0, "bfloat16": 3.0}) == "float32"


def test_a_burst_of_load_from_another_process_slows_every_candidate_alike(monkeypatch):
    """Two rounds' worth of the probe's calls run 10x slower (another worker probing beside it): timed one block after
    another, that burst would fall on one candidate's every call; in rotating turns each keeps a quick round."""
    clock, calls = [0.0], []
    monkeypatch.setattr(compute.time, "perf_counter", lambda: clock[0])

    def step(name):
        def run():
            calls.append(name)
            clock[0] += 10.0 if 7 <= len(calls) <= 12 else 1.0
        return run

    best = compute._best_times({name: step(name) for name in PLAIN_CANDIDATES}, repeats=5)
    assert best == dict.fromkeys(PLAIN_CANDIDATES, 1.0)
    timed = calls[len(PLAIN_CANDIDATES):]  # after one warm-up call each
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert len(rounds) == 5 and all(sorted(r) == sorted(PLAIN_CANDIDATES) for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # the order rotates: no candidate always goes first


@pytest.mark.parametrize("quantized, candidates", [(False, PLAIN_CANDIDATES), (True, QUANTIZED_CANDIDATES)])
def test_the_probe_times_every_candidate_on_this_cpu_and_takes_the_fastest_by_the_rule(quantized, candidates):
    path = measured_cpu_path(quantized)
    assert path.how == "measured" and path.device == "cpu" and path.quantized is quantized
    assert set(path.seconds) == set(candidates) and all(s > 0 for s in path.seconds.values())
    assert path.choice == choose(path.seconds)
    text = path.description()
    assert "measured on this cpu" in text and all(f"{name} " in text for name in candidates)


def test_a_job_gets_the_measured_path_and_its_4bit_dtype_from_the_spec_when_it_names_one(cpu_compute):
    cpu_compute("auto")
    assert compute_path(tiny_spec(quantization="none"), "cpu") == measured_cpu_path(False)
    assert compute_path(tiny_spec(quantization="nf4"), "cpu") == measured_cpu_path(True)
    spec_path = compute_path(tiny_spec(quantization="nf4", compute_dtype="float32"), "cpu")
    assert (spec_path.choice, spec_path.how) == ("float32", "spec")
    assert spec_path.description() == "matmuls of the 4-bit layers in float32 (as the spec asks)"


@pytest.mark.parametrize("setting, plain, quantized", [
    ("float32", "float32", "float32"), ("bf16-autocast", "bf16-autocast", "bfloat16"), ("bfloat16", "bfloat16", "bfloat16"),
])
def test_the_operator_setting_forces_the_cpu_path(cpu_compute, setting, plain, quantized):
    cpu_compute(setting)
    lora, qlora = compute_path(tiny_spec(quantization="none"), "cpu"), compute_path(tiny_spec(quantization="nf4"), "cpu")
    assert (lora.choice, lora.how, qlora.choice, qlora.how) == (plain, "setting", quantized, "setting")
    assert lora.cpu_base_dtype == ("bfloat16" if plain == "bfloat16" else "float32") and qlora.cpu_base_dtype == "float32"
    assert lora.autocast_bf16 is (plain == "bf16-autocast")
    assert "LORAJOBS_CPU_COMPUTE" in lora.description()


def test_descriptions_say_what_runs_in_which_dtype():
    assert ComputePath("cpu", False, "bf16-autocast", "setting").description().startswith("base in float32, bf16 autocast")
    assert ComputePath("cuda", True, "bfloat16", "rule").description() == (
        "matmuls of the 4-bit layers in bfloat16 (rule for cuda: bf16 where supported)")


def test_the_attention_probe_keeps_float32_up_to_the_first_length_where_bf16_is_clearly_faster():
    path = measured_attention_path(4, 2, 16, 300)
    assert sorted(path.seconds) == [64, 128, 256]  # the probed lengths up to the spec's limit
    choices = [choose(path.seconds[n]) for n in sorted(path.seconds)]
    first_bf16 = next((n for n, c in zip(sorted(path.seconds), choices) if c == "bfloat16"), None)
    assert path.fp32_below == (301 if first_bf16 is None else 0 if first_bf16 == 64 else first_bf16)
    assert "64 tokens: float32 " in path.description() and "256 tokens" in path.description()


def test_attention_descriptions_say_which_examples_attend_in_float32():
    timings = {64: {"float32": 0.001, "bfloat16": 0.002}, 1024: {"float32": 0.05, "bfloat16": 0.03}}
    assert AttentionPath(1024, timings).description().startswith("attention in float32 for examples under 1024 tokens")
    assert "for every example" in AttentionPath(2049, timings).description()
    assert "for no example" in AttentionPath(0, timings).description()


def test_only_a_plain_lora_job_computing_in_bf16_on_the_cpu_probes_its_attention(cpu_compute):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    cpu_compute("float32")
    assert attention_path(tiny_spec(quantization="none"), "cpu", config) is None
    cpu_compute("bfloat16")
    assert attention_path(tiny_spec(quantization="nf4"), "cpu", config) is None  # its hidden states are float32
    assert attention_path(tiny_spec(quantization="none"), "cuda", config) is None
    path = attention_path(tiny_spec(quantization="none", max_seq_length=128), "cpu", config)
    assert path == measured_attention_path(4, 2, 16, 128) and sorted(path.seconds) == [64, 128]
