"""Generate the demo dataset: product-catalogue support chats for the fictional Northwind Outfitters.

Every fact (a product's price, SKU, materials, sizes, colours, warranty, weight, or a store policy)
is asked in training with two or three phrasings; the validation file asks a sample of the same
facts with phrasings training never uses, and expects the same answers. Held-out loss therefore
drops only when an adapter has learned the catalogue, not the questions.

    python examples/make_demo_dataset.py            # rewrites examples/demo/{train,valid}.jsonl
    python examples/make_demo_dataset.py --out DIR  # writes them elsewhere

The output is byte-identical on every run (fixed seed, fixed key order, LF line endings).
"""

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
DEMO_DIR = Path(__file__).resolve().parent / "demo"
TRAIN_PHRASINGS_PER_PRODUCT_FACT = 2
VALID_PRODUCT_FACTS = 48
VALID_POLICY_FACTS = 12

# fact -> (answer, phrasings for training, phrasings held out for validation)
PRODUCT_FACTS = {
    "price": (
        "The {name} costs {price}.",
        ["How much is the {name}?", "What does the {name} cost?", "What's the price of the {name}?",
         "Price check on the {name}, please."],
        ["If I buy the {name}, how much will I pay?", "What would the {name} set me back?"],
    ),
    "sku": (
        "The {name} is SKU {sku}.",
        ["What's the SKU of the {name}?", "Which item number is the {name}?",
         "I need the product code for the {name}."],
        ["What code should I give the store to find the {name}?", "How is the {name} listed in your system?"],
    ),
    "materials": (
        "The {name} is made of {materials}.",
        ["What is the {name} made of?", "Which materials does the {name} use?", "What fabric is the {name}?"],
        ["Tell me what materials go into the {name}.", "What's the {name} constructed from?"],
    ),
    "sizes": (
        "The {name} comes in {sizes}.",
        ["What sizes does the {name} come in?", "Which sizes are available for the {name}?",
         "Is the {name} sold in different sizes?"],
        ["What size options do I have with the {name}?", "Can I get the {name} in another size?"],
    ),
    "colors": (
        "The {name} comes in {colors}.",
        ["What colours does the {name} come in?", "Which colors can I get the {name} in?",
         "Is the {name} available in other colours?"],
        ["What color choices are there for the {name}?", "Which shades is the {name} offered in?"],
    ),
    "warranty": (
        "The {name} has {warranty}.",
        ["What's the warranty on the {name}?", "How long is the {name} covered by warranty?",
         "Does the {name} come with a guarantee?"],
        ["If the {name} breaks, how long am I covered?", "What guarantee do you give on the {name}?"],
    ),
    "weight": (
        "The {name} weighs {weight}.",
        ["How much does the {name} weigh?", "What's the weight of the {name}?", "Is the {name} heavy?"],
        ["How heavy is the {name}?", "What will the {name} add to my pack weight?"],
    ),
    "sku_lookup": (
        "{sku} is the {name}, priced at {price}.",
        ["What is item {sku}?", "My receipt says {sku}. What product is that?", "Which product has SKU {sku}?"],
        ["Can you tell me what {sku} refers to?", "I saw {sku} on an order. What did I buy?"],
    ),
}


def chat(system_prompt: str, question: str, answer: str) -> dict:
    """One chat example: the shop's system prompt, a customer's question, the grounded answer."""
    return {
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def facts(catalogue: dict) -> tuple[list[tuple[str, list[str], list[str]]], list[tuple[str, list[str], list[str]]]]:
    """Every product fact and every policy as (answer, training phrasings, held-out phrasings)."""
    product_facts = []
    for product in catalogue["products"]:
        for answer, train, valid in PRODUCT_FACTS.values():
            product_facts.append(
                (answer.format(**product), [q.format(**product) for q in train], [q.format(**product) for q in valid])
            )
    policy_facts = [(p["answer"], p["train_questions"], p["valid_questions"]) for p in catalogue["policies"]]
    return product_facts, policy_facts


def build(catalogue: dict) -> tuple[list[dict], list[dict]]:
    """The training and validation examples, in a fixed shuffled order."""
    rng = random.Random(SEED)
    system_prompt = catalogue["system_prompt"]
    product_facts, policy_facts = facts(catalogue)
    train = []
    for answer, phrasings, _ in product_facts:
        for question in rng.sample(phrasings, TRAIN_PHRASINGS_PER_PRODUCT_FACT):
            train.append(chat(system_prompt, question, answer))
    for answer, phrasings, _ in policy_facts:
        train.extend(chat(system_prompt, question, answer) for question in phrasings)
    held_out = rng.sample(product_facts, VALID_PRODUCT_FACTS) + rng.sample(policy_facts, VALID_POLICY_FACTS)
    valid = [chat(system_prompt, rng.choice(phrasings), answer) for answer, _, phrasings in held_out]
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for example in examples:
            file.write(json.dumps(example, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder for train.jsonl and valid.jsonl")
    args = parser.parse_args()
    catalogue = json.loads((DEMO_DIR / "catalogue.json").read_text(encoding="utf-8"))
    train, valid = build(catalogue)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    print(f"wrote {len(train)} training and {len(valid)} validation examples to {args.out}")


if __name__ == "__main__":
    main()
