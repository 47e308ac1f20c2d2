"""The compute path: measured on this CPU by timing the layers training runs, forced by a setting, or the spec's."""

import pytest

from core.settings import get_settings
from tests.worker.conftest import tiny_spec
from worker.training.compute import (
    MIN_GAIN,
    PLAIN_CANDIDATES,
    QUANTIZED_CANDIDATES,
    ComputePath,
    choose,
    compute_path,
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
