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
