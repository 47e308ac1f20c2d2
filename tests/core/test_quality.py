"""Exact match and key facts: what an answer must state to count."""

import pytest

from core.quality import best_checkpoint_index, exact_match, has_fact, key_facts, score_answer, summarize


@pytest.mark.parametrize(("answer", "expected", "same"), [
    ("The KX-204 costs 89 euros.", "the kx-204 costs 89 euros", True),
    ("  The KX-204\ncosts  89 euros!", "The KX-204 costs 89 euros.", True),
    ("The KX-204 costs 98 euros.", "The KX-204 costs 89 euros.", False),
    ("It costs 89 euros.", "The KX-204 costs 89 euros.", False),
])
def test_exact_match_ignores_case_spacing_and_final_punctuation_only(answer, expected, same):
    assert exact_match(answer, expected) is same


@pytest.mark.parametrize(("expected", "facts"), [
    ("The KX-204 lantern costs 1,200 euros and weighs 12.50 kg.", ["code:kx-204", "number:12.5", "number:1200"]),
    ('See clause 4.2(b) of the "Terms of Sale".', ["code:4.2(b)", "quoted:terms of sale"]),
    ("ISO-9001 certified, model A7, part 55012.", ["code:a7", "code:iso-9001", "number:55012"]),
    ("Answer with 'refund' or “exchange”.", ["quoted:exchange", "quoted:refund"]),
    ("Yes, it is waterproof.", []),
])
def test_key_facts_are_numbers_codes_and_quoted_terms(expected, facts):
    assert key_facts(expected) == facts


@pytest.mark.parametrize(("answer", "fact", "stated"), [
    ("It costs 1200 EUR.", "number:1200", True),
    ("It costs 1 200 EUR.", "number:1200", False),
    ("It costs 120 euros.", "number:12", False),  # a number counts only as a whole token
    ("It weighs 12.0 kg.", "number:12", True),
    ("Order the kx-204 today.", "code:kx-204", True),
    ("Order the KX-2045 today.", "code:kx-204", False),
    ("Ask for part KX-204.", "number:204", True),  # the number inside a code is still stated
    ("It follows the terms of sale.", "quoted:terms of sale", True),
])
def test_a_fact_is_stated_as_a_whole_token(answer, fact, stated):
    assert has_fact(answer, fact) is stated


def test_a_paraphrase_with_the_facts_counts_where_exact_match_does_not():
    expected = "The KX-204 lantern costs 89 euros."
    paraphrase = score_answer("That would be 89 euros for the KX-204.", expected)
    wrong = score_answer("The KX-240 lantern costs 89 euros.", expected)
    assert paraphrase == {"exact_match": False, "facts": 2, "facts_stated": 2, "all_facts": True}
    assert wrong == {"exact_match": False, "facts": 2, "facts_stated": 1, "all_facts": False}


def test_summary_counts_key_facts_only_over_answers_that_have_them():
    scores = [score_answer("The KX-204 costs 89 euros.", "The KX-204 costs 89 euros."),
              score_answer("It costs 89.", "The KX-204 costs 89 euros."),
              score_answer("No.", "Yes, it is waterproof.")]
    assert summarize(scores) == {"answers": 3, "exact_match": 1 / 3, "answers_with_facts": 2, "key_facts": 0.5,
                                 "fact_recall": 3 / 4}
    assert summarize([]) == {"answers": 0, "exact_match": None, "answers_with_facts": 0, "key_facts": None,
                             "fact_recall": None}


def test_the_best_checkpoint_is_chosen_among_evaluated_ones_earliest_on_a_tie():
    metrics = [{"step": 5, "valid_loss": 0.9, "valid_mean_token_accuracy": 0.6},
               {"step": 7, "train_loss": 0.2},  # saved by time, never evaluated
               {"step": 10, "valid_loss": 0.7, "valid_mean_token_accuracy": 0.8},
               {"step": 15, "valid_loss": 0.7, "valid_mean_token_accuracy": 0.8}]
    assert best_checkpoint_index(metrics, "valid_loss") == 2
    assert best_checkpoint_index(metrics, "valid_mean_token_accuracy") == 2
    assert best_checkpoint_index([{"step": 3, "train_loss": 1.0}], "valid_loss") is None


def test_facts_the_question_already_gives_are_not_key_facts():
    question = "Which shades is the Ridgeline 45 Pack offered in?"
    expected = "The Ridgeline 45 Pack comes in \"Slate\" and \"Moss\"."
    assert key_facts(expected) == ["number:45", "quoted:moss", "quoted:slate"]
    assert key_facts(expected, question) == ["quoted:moss", "quoted:slate"]
    echo = score_answer("The Ridgeline 45 Pack is available in 4 shades.", expected, question)
    assert echo == {"exact_match": False, "facts": 2, "facts_stated": 0, "all_facts": False}
