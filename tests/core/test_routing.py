"""Routing by GPU class and out-of-memory recovery, as pure decisions (core/routing.py, docs/planning.md)."""

import itertools

import pytest

from core.planning import make_plan, parse_gpu_classes
from core.queue import GPU_QUEUE
from core.routing import (
    MAX_OOM_HALVINGS,
    DoesNotFit,
    after_oom,
    class_for_memory,
    configured_classes,
    place,
    planned_seconds,
    predicted_peak,
)
from core.settings import Settings
from core.spec import JobSpec

LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
              "num_attention_heads": 32, "vocab_size": 32000}
LLAMA_2_70B = {**LLAMA_2_7B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
               "num_attention_heads": 64, "num_key_value_heads": 8}
STATS = {"count": 1000, "mean": 300.0, "p95": 480, "max": 512}
CLASSES = "gpu-24g,gpu-48g,gpu-80g,gpu-141g"


def _spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"model": "meta/llama", "max_seq_length": 512, **fields})


def _placed(config: dict, spec: JobSpec, classes: str = CLASSES) -> dict:
    settings = Settings(gpu_classes=classes)
    plan = make_plan(config, spec, token_stats=STATS, gpu_classes=configured_classes(settings))
    return place(settings, spec, plan)


def test_without_configured_classes_every_job_goes_to_the_gpu_queue():
    spec = _spec()
    plan = make_plan(LLAMA_2_70B, spec, token_stats=STATS)
    assert place(Settings(gpu_classes=""), spec, plan) == {"queue": GPU_QUEUE, "class": None, "oom_halvings": 0}


def test_a_job_goes_to_the_smallest_class_that_fits_with_the_class_s_micro_batch():
    qlora = _placed(LLAMA_2_7B, _spec(quantization="nf4"))
    assert qlora["queue"] == qlora["class"] == "gpu-24g"
    assert qlora["micro_batch_size"] * qlora["gradient_accumulation_steps"] == 8
    lora_70b = _placed(LLAMA_2_70B, _spec(quantization="none"))
    assert lora_70b["class"] == "gpu-141g"  # 140 GB of bf16 weights alone: no smaller card
    assert lora_70b["gradient_checkpointing"] is not None


def test_a_micro_batch_the_spec_names_is_kept():
    placed = _placed(LLAMA_2_7B, _spec(quantization="nf4", micro_batch_size=2, batch_size=8))
    assert "micro_batch_size" not in placed and placed["class"] == "gpu-24g"


def test_a_job_that_fits_no_class_is_refused_with_the_plan_and_advice():
    with pytest.raises(DoesNotFit) as refused:
        _placed(LLAMA_2_70B, _spec(quantization="none"), classes="gpu-24g,gpu-48g")
    error = refused.value
    assert error.status_code == 400 and error.code == "does_not_fit"
    assert error.extra["plan"]["object"] == "fine_tuning.job.plan"
    assert error.extra["plan"]["smallest_fitting_class"] is None
    assert "quantization='nf4'" in error.message and error.extra["plan"]["advice"]


def test_an_unknown_architecture_is_never_refused_it_goes_to_the_largest_class():
    placed = _placed({"model_type": "never-heard-of-it"}, _spec(), classes="gpu-24g,gpu-80g")
    assert placed["class"] == "gpu-80g"


def test_the_cpu_class_trains_on_the_gpu_queue():
    placed = _placed({**LLAMA_2_7B, "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                      "num_attention_heads": 4}, _spec(), classes="cpu:64")
    assert placed == {**placed, "queue": GPU_QUEUE, "class": "cpu"}


@pytest.mark.parametrize(("memory", "served"), [(23.6, "gpu-24g"), (44.4, "gpu-24g"), (79.6, "gpu-80g"),
                                                (139.8, "gpu-80g"), (143.0, "gpu-141g"), (8.0, None)])
def test_a_card_serves_the_largest_class_whose_memory_it_has(memory, served):
    classes = parse_gpu_classes("gpu-24g,gpu-80g,gpu-141g,cpu:64")
    found = class_for_memory(classes, memory)
    assert (found.name if found else None) == served


CONFIGURED = parse_gpu_classes(CLASSES)


@pytest.mark.parametrize(("micro", "accumulation", "halvings", "class_name"), list(itertools.product(
    [1, 2, 3, 4, 8, 16], [1, 2, 3], [0, 1, 2], ["gpu-24g", "gpu-48g", "gpu-80g", "gpu-141g", None])))
def test_out_of_memory_halves_twice_then_moves_up_then_fails_keeping_the_batch(micro, accumulation, halvings,
                                                                               class_name):
    batch = micro * accumulation
    step = after_oom(micro_batch_size=micro, gradient_accumulation_steps=accumulation, halvings=halvings,
                     class_name=class_name, classes=CONFIGURED)
    assert step.micro_batch_size * step.gradient_accumulation_steps == batch
    if halvings < MAX_OOM_HALVINGS and micro > 1:
        assert step.action == "halve" and step.class_name == class_name
        assert step.micro_batch_size <= micro // 2 and batch % step.micro_batch_size == 0
    elif class_name not in (None, "gpu-141g"):
        names = [c.name for c in CONFIGURED]
        assert step.action == "move" and step.class_name == names[names.index(class_name) + 1]
    else:
        assert step.action == "fail" and "no larger class" in step.message


def test_a_move_takes_the_larger_class_s_planned_micro_batch():
    plan = {"classes": [{"name": "gpu-48g", "micro_batch_size": 4}]}
    step = after_oom(micro_batch_size=1, gradient_accumulation_steps=8, halvings=2, class_name="gpu-24g",
                     classes=CONFIGURED, plan=plan)
    assert (step.action, step.class_name, step.micro_batch_size, step.gradient_accumulation_steps) == \
        ("move", "gpu-48g", 4, 2)


def test_out_of_memory_with_activations_kept_recomputes_them_first_unless_the_spec_said_so():
    kept = dict(micro_batch_size=4, gradient_accumulation_steps=2, halvings=0, class_name="gpu-24g", classes=CONFIGURED)
    step = after_oom(**kept, gradient_checkpointing=False)
    assert (step.action, step.micro_batch_size, step.class_name, step.gradient_checkpointing) == \
        ("recompute", 4, "gpu-24g", True)
    assert "with gradient checkpointing" in step.message
    # already recomputing, or kept because the spec asked for it: halve as before
    assert after_oom(**kept, gradient_checkpointing=True).action == "halve"
    halved = after_oom(**kept, gradient_checkpointing=False, spec_checkpointing=False)
    assert halved.action == "halve" and halved.gradient_checkpointing is None


def test_a_move_takes_the_larger_class_s_planned_checkpointing():
    plan = {"classes": [{"name": "gpu-48g", "micro_batch_size": 2, "gradient_checkpointing": False}]}
    moved = dict(micro_batch_size=1, gradient_accumulation_steps=8, halvings=2, class_name="gpu-24g",
                 classes=CONFIGURED, plan=plan, gradient_checkpointing=True)
    step = after_oom(**moved)
    assert (step.action, step.class_name, step.micro_batch_size, step.gradient_checkpointing) == \
        ("move", "gpu-48g", 2, False)
    assert after_oom(**moved, spec_checkpointing=True).gradient_checkpointing is None  # the spec's stays


def test_the_prediction_compared_with_the_measured_peak_is_the_class_that_ran():
    spec = _spec(quantization="nf4")
    plan = make_plan(LLAMA_2_7B, spec, token_stats=STATS).model_dump(mode="json")
    by_name = {c["name"]: c["memory"]["peak"] for c in plan["classes"]}
    assert predicted_peak(plan, {"class": "gpu-48g"}, "cuda") == ("gpu-48g", by_name["gpu-48g"])
    assert predicted_peak(plan, {}, "cpu") == ("cpu", by_name["cpu"])
    assert predicted_peak(plan, {}, "cuda", peak_device_gib=79.65) == ("gpu-80g", by_name["gpu-80g"])
    assert predicted_peak(None, {}, "cpu") is None
    assert planned_seconds(plan, {"class": "gpu-24g"}) == next(
        c["duration_seconds"] for c in plan["classes"] if c["name"] == "gpu-24g")


def test_a_spec_s_gradient_checkpointing_is_what_the_plan_and_the_class_use():
    stats = {"count": 1000, "mean": 3000.0, "p95": 4096, "max": 4096}
    settings = Settings(gpu_classes=CLASSES)
    placed = {}
    for choice in (None, False, True):
        spec = _spec(quantization="none", max_seq_length=4096, gradient_checkpointing=choice)
        plan = make_plan(LLAMA_2_7B, spec, token_stats=stats, gpu_classes=configured_classes(settings))
        assert all(c.gradient_checkpointing is choice for c in plan.classes) or choice is None
        placed[choice] = place(settings, spec, plan)
    # At Llama-2's full context a bf16 7B fits 24 GB only with checkpointing; forbidden, it goes to a larger class.
    assert placed[None]["class"] == placed[True]["class"] == "gpu-24g" and placed[True]["gradient_checkpointing"]
    assert placed[False]["class"] != "gpu-24g" and placed[False]["gradient_checkpointing"] is False


def test_a_4_bit_job_recomputes_activations_only_where_memory_needs_it():
    stats = {"count": 1000, "mean": 3000.0, "p95": 4096, "max": 4096}
    settings = Settings(gpu_classes=CLASSES)
    placed, plans = {}, {}
    for choice in (None, False):
        spec = _spec(quantization="nf4", max_seq_length=4096, gradient_checkpointing=choice)
        plan = make_plan(LLAMA_2_7B, spec, token_stats=stats, gpu_classes=configured_classes(settings))
        plans[choice], placed[choice] = {c.name: c for c in plan.classes}, place(settings, spec, plan)
    # QLoRA 7B at 4,096 tokens: 24 and 48 GB need recomputed activations, 80 GB and up train without them.
    assert [plans[None][n].gradient_checkpointing for n in ("gpu-24g", "gpu-48g", "gpu-80g", "gpu-141g")] == [
        True, True, False, False]
    assert placed[None]["class"] == "gpu-24g" and placed[None]["gradient_checkpointing"] is True
    # Turned off by the spec, it needs a larger card, and trains there without them.
    assert not plans[False]["gpu-24g"].fits and placed[False]["class"] == "gpu-80g"
    assert placed[False]["gradient_checkpointing"] is False
