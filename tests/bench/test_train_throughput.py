"""The training benchmark's bookkeeping: the long-tailed data it generates, and how runs become medians and ratios."""

import json

import pytest

from bench.longtail_dataset import write
from bench.train_throughput import machine_speed, slow_baselines, spread, steal_seconds, summarize


def test_the_long_tailed_dataset_is_reproducible_and_long_tailed(tmp_path):
    first = write(tmp_path / "a", 200, 8)
    second = write(tmp_path / "b", 200, 8)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    words = sorted(len(json.loads(line)["messages"][0]["content"].split()) for line in first[0].read_text().splitlines())
    median, p95, longest = words[100], words[190], words[-1]
    assert median < 100 and longest > 4 * median and p95 > 2 * median  # most rows short, a few very long
    answers = {json.loads(line)["messages"][1]["content"] for line in first[0].read_text().splitlines()}
    assert len(answers) > 50  # the trained answers vary: the task is not one string


def _run(tps: float, loss: float | None = 2.0) -> dict:
    return {"tokens_per_second": tps, "peak_rss_mb": 1000.0, "final_eval_loss": loss, "real_tokens": 100, "steps": 4}


def test_the_core_is_compared_with_the_fastest_baseline_by_medians():
    runs = {"demo:lora:core": [_run(300), _run(330), _run(310)],
            "demo:lora:b1": [_run(100, 2.02), _run(90, 2.02), _run(110, 2.02)],
            "demo:lora:c2": [_run(200), _run(250), _run(240)],
            "demo:lora:b2": [_run(1000), _run(1000), _run(1000)]}  # a reference: never "the best baseline"
    core = summarize(runs)["demo"]["lora"]["core"]
    assert core["tokens_per_second"] == {"median": 310, "min": 300, "max": 330, "spread_percent": 100 * 30 / 310}
    assert core["best_baseline"] == "c2" and core["vs_best_baseline"] == 310 / 240
    assert core["ratios"]["b1"] == 310 / 100 and core["ratios"]["b2"] == 0.31
    assert round(core["eval_loss_vs_b1_percent"], 6) == round(100 * (2.0 / 2.02 - 1), 6)


def test_the_machine_s_own_drift_is_set_beside_each_variant_s_spread():
    """A shared VM slows down between rounds: its speed, timed around each run, says how much of a spread it was."""
    def measured(tps: float, gflops: float, round_no: int) -> dict:
        return {**_run(tps), "machine_gflops": gflops, "round": round_no, "steal_percent": 2.0 * round_no}

    runs = {"demo:lora:core": [measured(200, 100, 1), measured(300, 150, 2), measured(310, 150, 3)],
            "demo:lora:b1": [measured(100, 100, 1), measured(150, 150, 2), measured(100, 100, 3)],
            "demo:lora:c1": [measured(40, 100, 1)]}  # ran once: no round beside the core's but the first
    core = summarize(runs)["demo"]["lora"]["core"]
    assert core["best_baseline"] == "b1" and core["vs_best_baseline_by_round"] == [2.0, 2.0, 3.1]
    assert core["machine_gflops"]["spread_percent"] == 100 * 50 / 150
    # every run rescaled to the benchmark's median machine speed (100 GFLOP/s over all seven runs)
    rescaled = core["tokens_per_second_at_median_machine_speed"]
    assert rescaled == pytest.approx(spread([200.0, 200.0, 310 * 100 / 150]))
    assert rescaled["spread_percent"] < 4 and core["tokens_per_second"]["spread_percent"] > 30
    assert core["steal_percent_max"] == 6.0
    assert "machine_gflops" not in summarize({"demo:lora:core": [_run(1)]})["demo"]["lora"]["core"]


def test_the_machine_s_speed_is_a_positive_rate():
    assert machine_speed() > 0 and steal_seconds() >= 0


def test_the_eval_loss_is_taken_from_the_run_that_measured_it():
    runs = {"demo:lora:core": [_run(300, 1.9), _run(310, None), _run(305, None)], "demo:lora:b1": [_run(200, 2.0)]}
    core = summarize(runs)["demo"]["lora"]["core"]
    assert core["final_eval_loss"] == 1.9 and core["runs"] == 3
    assert round(core["eval_loss_vs_b1_percent"], 6) == round(100 * (1.9 / 2.0 - 1), 6)


def test_a_baseline_far_behind_the_fastest_in_round_1_runs_once():
    first = {"demo:lora:core": [_run(900)], "demo:lora:b1": [_run(200)], "demo:lora:c1": [_run(149)],
             "demo:lora:c2": [_run(151)], "demo:lora:b2": [_run(50)],
             "longtail:lora:b1": [_run(100)], "longtail:lora:c1": [_run(80)], "longtail:lora:c2": [_run(74)]}
    # per dataset and mode, against the fastest baseline (never the core; b2 is not a baseline)
    assert slow_baselines(first) == {"demo:lora:c1", "longtail:lora:c2"}


def test_one_round_runs_every_variant_and_the_core_trains_exactly_the_baseline_s_rows(tmp_path, smollm2_models_dir):
    """The whole benchmark, small: forked runs, the summary, the JSON a user reads."""
    from bench.train_throughput import main

    out = tmp_path / "throughput.json"
    main(["--datasets", "demo", "--modes", "lora", "--variants", "core,b1,c2", "--rounds", "1", "--examples", "4",
          "--valid-examples", "2", "--batch-size", "2", "--models-dir", str(smollm2_models_dir), "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["partial"] is False and results["machine"]["compute_choice"]["lora"] in (
        "float32", "bf16-autocast", "bfloat16")
    attention = results["machine"]["attention_path"]["lora"]  # only where the base computes in bf16
    assert (attention is None) is (results["machine"]["compute_choice"]["lora"] == "float32")
    assert results["runs"]["demo:lora:core"][0]["compute"].startswith(results["machine"]["compute_path"]["lora"])
    variants = results["summary"]["demo"]["lora"]
    assert set(variants) == {"core", "b1", "c2"} and all(v["runs"] == 1 for v in variants.values())
    core, b1 = variants["core"], variants["b1"]
    assert core["real_tokens"] == b1["real_tokens"] > 0 and core["steps"] == b1["steps"] == 2
    assert core["final_eval_loss"] == pytest.approx(b1["final_eval_loss"], rel=1e-4)  # same rows, same labels
    assert core["ratios"]["b1"] == core["tokens_per_second"]["median"] / b1["tokens_per_second"]["median"]
    first = results["runs"]["demo:lora:core"][0]
    assert first["round"] == 1 and first["machine_gflops"] > 0 and 0 <= first["steal_percent"] <= 100
    assert core["vs_best_baseline_by_round"] == [core["vs_best_baseline"]]  # one round: the median's ratio


def test_examples_are_given_per_dataset_or_for_all():
    from bench.train_throughput import parse_args

    assert parse_args([]).examples == {"demo": 64, "longtail": 16}
    assert parse_args(["--examples", "48"]).examples == {"demo": 48, "longtail": 48}
    assert parse_args(["--examples", "longtail=8"]).examples == {"demo": 64, "longtail": 8}
    with pytest.raises(SystemExit):
        parse_args(["--examples", "alpaca=8"])
