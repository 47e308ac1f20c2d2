"""Exact match and key facts: whether an answer states what the expected answer states.

Held-out loss falls as soon as a model learns a dataset's format; these figures only rise when it
states the facts. Key facts are what a domain answer exists to carry and a paraphrase must keep:
numbers, codes (a product's `KX-204`, a clause's `4.2(b)`) and quoted terms. Pure functions, torch-free.
"""

import re
import unicodedata

# A number: digits with optional thousands separators and decimals ("1,200", "12.5", "0.75").
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.])\d+(?:\.\d+)?(?![\w])")
# A code: a word mixing letters and digits, or capitals joined by - / _ . to digits or capitals ("KX-204", "A7",
# "ISO-9001", "4.2(b)"); plain words and plain numbers are not codes.
_CODE = re.compile(r"(?<![\w-])(?=[\w./()-]*\d)(?=[\w./()-]*[A-Za-z])[A-Za-z0-9][\w./()-]*[A-Za-z0-9)](?![\w-])")
_QUOTED = re.compile(r"\"([^\"\n]{1,80})\"|“([^”\n]{1,80})”|«([^»\n]{1,80})»|(?<!\w)'([^'\n]{1,80})'(?!\w)")
_SPACE = re.compile(r"\s+")
_TRAILING = ".,;:!?"


def normalize(text: str) -> str:
    """Case, Unicode forms, runs of whitespace and trailing punctuation do not change an answer."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", text).strip().rstrip(_TRAILING).strip()


def exact_match(answer: str, expected: str) -> bool:
    """The whole answer equals the expected one, up to `normalize`."""
    return normalize(answer) == normalize(expected)


def _plain_number(number: str) -> str:
    """'1,200' and '1200' are the same number; '12.50' and '12.5' too."""
    number = number.replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def numbers(text: str) -> set[str]:
    return {_plain_number(m.group(0)) for m in _NUMBER.finditer(text)}


def codes(text: str) -> set[str]:
    return {m.group(0).casefold() for m in _CODE.finditer(text)}


def quoted_terms(text: str) -> set[str]:
    return {normalize(next(g for g in m.groups() if g)) for m in _QUOTED.finditer(text)} - {""}


def key_facts(expected: str, prompt: str = "") -> list[str]:
    """The expected answer's key facts, each as `kind:value`: numbers outside codes, codes, quoted terms.

    Facts the prompt already states are left out: echoing "the Ridgeline 45 Pack" from the question is not
    knowing its colours.
    """
    found_codes = codes(expected)
    in_codes = set().union(*(numbers(code) for code in found_codes)) if found_codes else set()
    facts = [f"code:{c}" for c in sorted(found_codes)]
    facts += [f"number:{n}" for n in sorted(numbers(expected) - in_codes)]
    facts += [f"quoted:{q}" for q in sorted(quoted_terms(expected))]
    return [fact for fact in facts if not (prompt and has_fact(prompt, fact))]


def has_fact(answer: str, fact: str) -> bool:
    """Whether `answer` states one key fact: the same number or code as a whole token, the quoted term anywhere."""
    kind, value = fact.split(":", 1)
    if kind == "number":
        return value in numbers(answer) | set().union(*(numbers(c) for c in codes(answer)))
    if kind == "code":
        return value in codes(answer)
    return value in normalize(answer)


def score_answer(answer: str, expected: str, prompt: str = "") -> dict:
    """One answer against its expected answer: exact match, and which key facts (not given by the prompt) it states."""
    facts = key_facts(expected, prompt)
    stated = [fact for fact in facts if has_fact(answer, fact)]
    return {"exact_match": exact_match(answer, expected), "facts": len(facts), "facts_stated": len(stated),
            "all_facts": bool(facts) and len(stated) == len(facts)}


def summarize(scores: list[dict]) -> dict:
    """Figures over a sample of scored answers.

    `exact_match`: share of answers equal to the expected one. `key_facts`: share of the answers whose expected
    answer has key facts that state all of them. `fact_recall`: share of all key facts stated. Null where the
    sample has nothing to count.
    """
    with_facts = [s for s in scores if s["facts"]]
    total_facts = sum(s["facts"] for s in scores)
    return {
        "answers": len(scores),
        "exact_match": sum(s["exact_match"] for s in scores) / len(scores) if scores else None,
        "answers_with_facts": len(with_facts),
        "key_facts": sum(s["all_facts"] for s in with_facts) / len(with_facts) if with_facts else None,
        "fact_recall": sum(s["facts_stated"] for s in scores) / total_facts if total_facts else None,
    }


HIGHER_IS_BETTER = {"valid_loss": False, "valid_mean_token_accuracy": True}


def best_checkpoint_index(metrics: list[dict], metric: str) -> int | None:
    """Which of the checkpoints' metrics is best by `metric` (the earliest on a tie); None when none has it.

    Checkpoints saved without an evaluation (a cancel, a time-based save) are never chosen.
    """
    scored = [(value, i) for i, m in enumerate(metrics) if (value := m.get(metric)) is not None]
    if not scored:
        return None
    if HIGHER_IS_BETTER[metric]:
        return max(scored, key=lambda pair: (pair[0], -pair[1]))[1]
    return min(scored)[1]
