"""The quality benchmark's generated catalogue: a few hundred chats when asked, the recorded smaller sets unchanged."""

import json
import random

import pytest

from examples.make_quality_datasets import GENERAL, catalogue, write


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_catalogue_of_24_products_holds_288_chats_and_keeps_the_first_twelve_as_recorded(tmp_path):
    small = write(tmp_path / "small", products=12)["facts"]
    large = write(tmp_path / "large", products=24)["facts"]
    assert len(_lines(large[0])) == 24 * 4 * 3 and len(_lines(large[1])) == 24 * 4 + len(GENERAL)
    products = catalogue(random.Random("0-facts"), 24)
    assert len({p["code"] for p in products}) == 24 and len({p["name"] for p in products}) == 24
    assert products[:12] == catalogue(random.Random("0-facts"), 12)  # the same facts as the 12-product runs
    # and the 12-product files themselves: a smaller catalogue is not re-drawn by the larger one's presence
    assert write(tmp_path / "again", products=12)["facts"][0].read_bytes() == small[0].read_bytes()
    held_out = {m["messages"][1]["content"] for m in _lines(large[1])}
    trained = {m["messages"][1]["content"] for m in _lines(large[0])}
    assert not held_out & trained  # every held-out question is phrased as no training question is


def test_more_products_than_the_catalogue_names_is_an_error():
    with pytest.raises(ValueError, match="at most 24"):
        catalogue(random.Random(0), 25)


def test_the_manner_kept_is_counted_by_the_answers_opening():
    from bench.quality import same_opening

    rows = [{"base": "To find 5 times 6, we multiply.", "tuned": "To find 5 times 6: 29."},
            {"base": "A day is a day of the week.", "tuned": "A day has 8 hours."},
            {"base": "The capital of Japan is Tokyo.", "tuned": "the Capital of Japan."}]
    assert same_opening(rows) == 2 and same_opening(rows, words=1) == 3 and same_opening([]) == 0


def test_the_run_records_each_steps_gradient_norm_from_the_jobs_training_log(tmp_path):
    from bench.quality import training_log
    from worker.training.artifacts import log_rows, write_training_log

    history = [{"step": 1, "epoch": 0.1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.8},
               {"step": 1, "valid_loss": 2.4, "valid_mean_token_accuracy": 0.3},
               {"step": 2, "valid_loss": 2.2, "valid_mean_token_accuracy": 0.4},  # evaluated, not logged
               {"step": 3, "epoch": 0.3, "loss": 2.0, "learning_rate": 2e-4}]  # no norm (clipping off)
    write_training_log(tmp_path / "training_log.csv", log_rows(history))
    assert training_log(tmp_path / "training_log.csv") == [
        {"step": 1, "train_loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.8},
        {"step": 3, "train_loss": 2.0, "learning_rate": 2e-4}]
