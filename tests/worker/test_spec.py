"""The job spec: defaults, refusals that name the field, and the written `auto` rule."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.general import GENERAL_QUESTIONS, REPLAY_PROMPTS
from core.spec import JobSpec, model_width, resolve_auto


def refused_fields(**fields) -> list[str]:
    with pytest.raises(ValidationError) as error:
        JobSpec(**fields)
    return [".".join(map(str, e["loc"])) for e in error.value.errors()]


def test_defaults_are_auto_quantization_on_all_linear_layers():
    spec = JobSpec(model="tiny/llama")
    assert (spec.quantization, spec.double_quant, spec.compute_dtype) == ("auto", True, "auto")
    assert (spec.lora.r, spec.lora.effective_alpha, spec.lora.target_modules) == (16, 32, "all-linear")
    assert spec.packing and not spec.train_on_inputs
    assert (spec.n_epochs, spec.batch_size, spec.learning_rate_multiplier) == ("auto", "auto", "auto")


def test_every_field_is_described():
    def undescribed(model) -> list[str]:
        return [name for name, f in model.model_fields.items() if not f.description]

    assert undescribed(JobSpec) == [] and undescribed(JobSpec.model_fields["lora"].default_factory().__class__) == []


def test_the_model_is_required_and_unknown_fields_are_refused():
    assert refused_fields() == ["model"]
    assert refused_fields(model="m", n_epoch=3) == ["n_epoch"]
    assert refused_fields(model="m", lora={"rank": 8}) == ["lora.rank"]


@pytest.mark.parametrize(("fields", "named"), [
    ({"learning_rate": 1e-4, "learning_rate_multiplier": 2.0}, "learning_rate_multiplier"),
    ({"batch_size": 8, "micro_batch_size": 3}, "micro_batch_size"),
    ({"batch_size": 4, "micro_batch_size": 8}, "micro_batch_size"),
    ({"quantization": "none", "compute_dtype": "float16"}, "compute_dtype"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"batch_size": -1}, "batch_size"),
    ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": {"target_modules": "mlp"}}, "lora.target_modules"),
    ({"quantization": "int8"}, "quantization"),
    ({"validation_fraction": 0.9}, "validation_fraction"),
])
def test_invalid_combinations_are_refused_naming_the_field(fields, named):
    assert any(f == named or f.startswith(f"{named}.") for f in refused_fields(model="m", **fields))


def test_openai_style_body_round_trips_through_json():
    spec = JobSpec.model_validate({"model": "m", "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5,
                                   "lora": {"r": 8, "target_modules": ["q_proj"]}})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(("n", "epochs", "batch", "micro", "replay"), [
    (3, 25, 1, 1, 0), (20, 25, 4, 4, 0), (48, 25, 8, 8, 0), (64, 25, 8, 8, 8), (144, 21, 8, 8, 18),
    (200, 15, 8, 8, 25), (288, 11, 8, 8, 36), (1000, 3, 8, 8, 64), (3000, 3, 16, 8, 64), (20_000, 1, 64, 8, 64),
])
def test_auto_values_follow_the_written_rule(n, epochs, batch, micro, replay):
    hp = resolve_auto(JobSpec(model="m"), n)
    assert (hp.n_epochs, hp.batch_size, hp.micro_batch_size, hp.general_replay) == (epochs, batch, micro, replay)
    assert hp.gradient_accumulation_steps * hp.micro_batch_size == hp.batch_size
    assert set(hp.auto_rules) == {"n_epochs", "batch_size", "micro_batch_size", "learning_rate_multiplier",
                                  "general_replay"}
    assert str(n) in hp.auto_rules["n_epochs"] and str(n) in hp.auto_rules["batch_size"]


def test_general_replay_is_a_count_of_the_built_in_prompts_or_auto():
    assert resolve_auto(JobSpec(model="m", general_replay=5), 20).general_replay == 5  # asked for: any data size
    assert resolve_auto(JobSpec(model="m", general_replay=0), 5000).general_replay == 0
    assert resolve_auto(JobSpec(model="m"), 288).auto_rules["general_replay"] == "288 examples // 8, at most 64 = 36"
    assert resolve_auto(JobSpec(model="m"), 63).auto_rules["general_replay"] == "63 examples < 64: 0"
    with pytest.raises(ValidationError) as refused:
        JobSpec(model="m", general_replay=len(REPLAY_PROMPTS) + 1)
    assert refused.value.errors()[0]["loc"] == ("general_replay",)
    assert "from 0 to 64 (the built-in prompts)" in str(refused.value)


def test_replayed_prompts_are_none_of_the_general_questions_that_measure_what_survived():
    from examples.make_quality_datasets import GENERAL  # the quality benchmark's facts sets ask these

    asked = {question.lower() for question, _ in GENERAL_QUESTIONS + GENERAL}
    assert len(set(REPLAY_PROMPTS)) == len(REPLAY_PROMPTS) == 64
    assert not asked & {prompt.lower() for prompt in REPLAY_PROMPTS}


def test_small_datasets_train_at_least_3000_examples_and_the_rule_says_so():
    hp = resolve_auto(JobSpec(model="m"), 144)  # a catalogue of 48 facts asked 3 ways
    assert hp.n_epochs * 144 >= 3000 and (hp.n_epochs - 1) * 144 < 3000
    assert hp.auto_rules["n_epochs"] == "144 examples × 3 < 3000: ceil(3000/144) capped at 25 = 21"
    assert resolve_auto(JobSpec(model="m"), 1000).n_epochs == 3  # no small set trains more than 3 epochs of 1,000


def test_auto_learning_rate_scales_with_the_square_root_of_the_batch():
    assert resolve_auto(JobSpec(model="m", batch_size=8), 100).learning_rate == pytest.approx(2e-4)
    assert resolve_auto(JobSpec(model="m", batch_size=32), 100).learning_rate == pytest.approx(4e-4)
    assert resolve_auto(JobSpec(model="m", batch_size=1), 100).learning_rate == pytest.approx(1e-4)
    assert resolve_auto(JobSpec(model="m", batch_size=256), 100).learning_rate == pytest.approx(4e-4)  # at most 2x


@pytest.mark.parametrize(("width", "rate"), [
    (576, 9.255e-4),  # SmolLM2-135M: where 1e-3 at batch 8 learnt facts in a third of the passes (benchmarks.md)
    (2048, 3.437e-4),  # 1B-2B models
    (4096, 2e-4),  # Llama 2/3 7B-8B, Mistral 7B: the QLoRA paper's rate
    (8192, 1.164e-4),  # 70B
    (16384, 1e-4),  # at least half the base rate
    (64, 1e-3),  # a tiny test model: at most 1e-3, the highest rate measured
    (None, 2e-4),  # width unknown: as a 7B
])
def test_auto_learning_rate_falls_with_the_models_width(width, rate):
    hp = resolve_auto(JobSpec(model="m", batch_size=8), 100, width)
    assert hp.learning_rate == pytest.approx(rate, rel=1e-3)
    assert hp.learning_rate_multiplier == pytest.approx(rate / 2e-4, rel=1e-3)
    rule = hp.auto_rules["learning_rate_multiplier"]
    assert (f"(width 4096 / {width})^0.781" in rule) if width else ("width unknown" in rule)


def test_explicit_learning_rate_or_multiplier_ignores_the_width():
    assert resolve_auto(JobSpec(model="m", learning_rate=3e-5), 100, 576).learning_rate == 3e-5
    hp = resolve_auto(JobSpec(model="m", batch_size=8, learning_rate_multiplier=1.0), 100, 576)
    assert hp.learning_rate == pytest.approx(2e-4) and "learning_rate_multiplier" not in hp.auto_rules


@pytest.mark.parametrize(("config", "width"), [
    ({"model_type": "llama", "hidden_size": 4096}, 4096),
    ({"model_type": "gpt2", "n_embd": 768}, 768),
    ({"model_type": "llava", "text_config": {"hidden_size": 5120}, "vision_config": {"hidden_size": 1024}}, 5120),
    ({"model_type": "mystery"}, None),
    (None, None),
])
def test_model_width_reads_the_language_models_hidden_size(config, width):
    assert model_width(config) == width


def test_explicit_values_pass_through_without_rules():
    spec = JobSpec(model="m", n_epochs=2, batch_size=12, micro_batch_size=4, learning_rate=3e-4, general_replay=10)
    hp = resolve_auto(spec, 500)
    assert (hp.n_epochs, hp.batch_size, hp.micro_batch_size, hp.gradient_accumulation_steps) == (2, 12, 4, 3)
    assert hp.learning_rate == 3e-4 and hp.general_replay == 10 and hp.auto_rules == {}


def test_explicit_batch_gets_the_largest_micro_batch_that_divides_it():
    hp = resolve_auto(JobSpec(model="m", batch_size=12, learning_rate_multiplier=1.0), 500)
    assert (hp.micro_batch_size, hp.gradient_accumulation_steps) == (6, 2)
    assert hp.learning_rate == pytest.approx(2e-4)


def test_the_spec_module_loads_no_training_library():
    code = "import sys, core.spec; print(sorted({'torch', 'transformers', 'peft', 'bitsandbytes'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
