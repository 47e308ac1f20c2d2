"""Three small domain datasets for measuring what a job learns (bench/quality.py, docs/benchmarks.md "Quality").

Generated from a seed, never hand-picked:
- `facts`: Q&A about a fictional outdoor-gear catalogue (product codes, prices, warranty years, weights). The
  held-out questions ask the same facts in phrasings no training question uses, plus a few general questions
  outside the domain (arithmetic, counts) that show whether general answering survives.
- `style`: plain shop notices rewritten in the shop's house style (a fixed opening, capitalised days, times in
  24-hour form); held out: new notices.
- `classify`: support messages answered with their category as text; held out: new messages.

    .venv/bin/python examples/make_quality_datasets.py OUT_DIR [--seed 0]
writes OUT_DIR/<name>/train.jsonl and OUT_DIR/<name>/valid.jsonl.
"""

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are the Nordvik Outfitters shop assistant."
NAMES = ["Aurora lantern", "Fjell tent", "Skarv jacket", "Myra boots", "Tind backpack", "Lysning headlamp",
         "Bre sleeping bag", "Elv water filter", "Vidde stove", "Furu hammock", "Storm poncho", "Rim trekking poles"]
# For --products above 12 (a catalogue of a few hundred chats), drawn after and apart from the first twelve, whose
# facts, held-out phrasings and order stay those of the runs already recorded.
MORE_NAMES = ["Kvist camp chair", "Hav dry bag", "Lyng fleece", "Stig trail shoes", "Tjern kayak paddle",
              "Nebb ice axe", "Dal rain cover", "Sno gaiters", "Fonn snowshoes", "Vang picnic blanket",
              "Skog bivy sack", "Berg helmet"]

# Per attribute: training phrasings, held-out phrasings (never seen in training) and the one answer form.
ATTRIBUTES = {
    "code": (["What is the product code of the {name}?", "Which product code does the {name} have?",
              "Give me the code for the {name}."],
             ["I need the catalogue number of the {name}.", "Under which code is the {name} listed?"],
             "The {name} has product code {code}."),
    "price": (["How much does the {name} cost?", "What is the price of the {name}?",
               "What do you charge for the {name}?"],
              ["If I buy the {name}, how much will I pay?", "What's the {name} going for?"],
              "The {name} costs {price} euros."),
    "warranty": (["How long is the warranty on the {name}?", "What warranty comes with the {name}?",
                  "For how many years is the {name} guaranteed?"],
                 ["If the {name} breaks, how long am I covered?", "What guarantee period applies to the {name}?"],
                 "The {name} has a {warranty}-year warranty."),
    "weight": (["How much does the {name} weigh?", "What is the weight of the {name}?",
                "How heavy is the {name}?"],
               ["Is the {name} light? Tell me its weight.", "What will the {name} add to my pack, in grams?"],
               "The {name} weighs {weight} grams."),
}
GENERAL = [("What is 12 plus 7?", "12 plus 7 is 19."), ("How many days are in a week?", "A week has 7 days."),
           ("How many legs does a spider have?", "A spider has 8 legs."),
           ("How many minutes are in an hour?", "An hour has 60 minutes.")]

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
EVENTS = ["the store closes", "the repair desk opens", "the rental counter closes", "the workshop starts",
          "the clearance sale begins", "deliveries arrive", "the climbing wall opens", "the café closes"]
CATEGORIES = {
    "billing": ["I was charged twice for order {n}.", "My card was billed {n} euros too much.",
                "The invoice for order {n} shows the wrong amount.", "Why did I pay {n} euros for shipping?"],
    "shipping": ["Order {n} has not arrived yet.", "Where is my parcel {n}?",
                 "The tracking for order {n} has not moved for days.", "Can you deliver order {n} to another address?"],
    "returns": ["I want to send back order {n}.", "How do I return the boots from order {n}?",
                "The jacket from order {n} does not fit, can I exchange it?", "Refund order {n} please."],
    "product": ["Is the tent from order {n} waterproof?", "Which stove works above 3000 metres?",
                "Does the {n} litre backpack fit cabin luggage?", "Can the lantern run on batteries?"],
}


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def _products(rng: random.Random, names: list[str], taken: set[str]) -> list[dict]:
    letters = "BCDFGHKLMNPRSTVXZ"
    products = []
    for name in names:
        code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randrange(100, 1000)}"
        while code in taken:  # never two products under one code
            code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randrange(100, 1000)}"
        taken.add(code)
        products.append({"name": name, "code": code, "price": rng.randrange(19, 400),
                         "warranty": rng.choice([1, 2, 3, 5, 10]), "weight": rng.randrange(80, 4000, 10)})
    return products


def catalogue(rng: random.Random, n_products: int = 12) -> list[dict]:
    if n_products > len(NAMES) + len(MORE_NAMES):
        raise ValueError(f"at most {len(NAMES) + len(MORE_NAMES)} products")
    products = _products(rng, NAMES, set())
    if n_products > len(NAMES):  # their own generator: the first twelve's draws (and rng's after them) are unchanged
        more = random.Random(f"more-{products[0]['code']}")
        products += _products(more, MORE_NAMES, {p["code"] for p in products})
    return products[:n_products]


def facts(rng: random.Random, n_products: int = 12) -> tuple[list[dict], list[dict]]:
    train, valid = [], []
    for product in catalogue(rng, n_products):
        for train_forms, held_out_forms, answer in ATTRIBUTES.values():
            expected = answer.format(**product)
            train += [_chat(form.format(**product), expected) for form in train_forms]
            valid.append(_chat(rng.choice(held_out_forms).format(**product), expected))
    valid += [_chat(question, answer) for question, answer in GENERAL]
    rng.shuffle(train)
    return train, valid


def _notice(rng: random.Random) -> tuple[str, str]:
    day, event = rng.choice(DAYS), rng.choice(EVENTS)
    hour = rng.randrange(7, 12)
    half = rng.choice(["", ":30"])
    plain = f"on {day} {event} at {hour}{half} pm"
    styled = f"Nordvik notice: on {day.capitalize()}, {event} at {hour + 12}:{half[1:] or '00'}."
    return plain, styled


def style(rng: random.Random, n_train: int = 120, n_valid: int = 30) -> tuple[list[dict], list[dict]]:
    seen, rows = set(), []
    while len(rows) < n_train + n_valid:
        plain, styled = _notice(rng)
        if plain not in seen:
            seen.add(plain)
            rows.append(_chat(f"Rewrite in our house style: {plain}", styled))
    return rows[:n_train], rows[n_train:]


def classify(rng: random.Random, n_train: int = 120, n_valid: int = 30) -> tuple[list[dict], list[dict]]:
    rows = []
    for i in range(n_train + n_valid):
        category = rng.choice(sorted(CATEGORIES))
        message = rng.choice(CATEGORIES[category]).format(n=rng.randrange(1000, 9999))
        rows.append(_chat(f"Classify this support message as billing, shipping, returns or product: {message}",
                          f"Category: {category}"))
    return rows[:n_train], rows[n_train:]


DATASETS = {"facts": facts, "style": style, "classify": classify}


def write(out: Path, seed: int = 0, products: int = 12) -> dict[str, tuple[Path, Path]]:
    """Every dataset under `out`; `products` (at most 24, 4 facts each) sizes the facts catalogue."""
    written = {}
    for name, make in DATASETS.items():
        rng = random.Random(f"{seed}-{name}")
        train, valid = make(rng, products) if name == "facts" else make(rng)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("valid", valid)):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[name] = (folder / "train.jsonl", folder / "valid.jsonl")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--products", type=int, default=12, help="products in the facts catalogue (4 facts each, at most 24)")
    args = parser.parse_args()
    for name, (train, valid) in write(args.out, args.seed, args.products).items():
        print(name, sum(1 for _ in open(train)), "training,", sum(1 for _ in open(valid)), "held-out")
