"""A chat dataset with a realistic long-tailed length distribution, generated offline and reproducibly.

Most real fine-tuning sets mix short exchanges with a few long ones (pasted logs, documents, threads).
Here each example asks for a summary of a maintenance log whose length follows a log-normal
distribution (median about 160 tokens, from about 70 to about 1,000 tokens with SmolLM2's tokenizer and its default system prompt), and
the answer names the machine, the fault and the action: the trained part stays short, as in most
instruction data, while the prompt carries the length.

    python bench/longtail_dataset.py --out DIR [--train 64 --valid 16]
"""

import argparse
import json
import math
import random
from pathlib import Path

SEED = 20261201
MACHINES = ["press 4", "the north conveyor", "kiln B", "the bottling line", "compressor 2", "the paint booth",
            "lathe 7", "the packing robot", "boiler 1", "the cooling tower"]
FAULTS = ["a worn drive belt", "a clogged filter", "a failed pressure sensor", "a loose coupling", "an overheating motor",
          "a leaking seal", "a misaligned guide rail", "a tripped breaker"]
ACTIONS = ["replaced the part", "cleaned and recalibrated it", "tightened the fittings", "reset and monitored it",
           "ordered a spare and ran at half speed", "shut it down for the next shift"]
FILLER = [
    "Operator reported {obs} at {time}.", "Reading on {gauge} was {value} at {time}.",
    "Shift lead walked the line and noted {obs}.", "No change after restarting the controller at {time}.",
    "Vibration on the main bearing measured {value} mm/s.", "Ambient temperature near {machine} was {value} degrees.",
    "Checked the lubrication schedule; last service {value} days ago.", "Spare parts bin for {machine} was inspected.",
    "Output dropped to {value} units per hour.", "Quality control flagged {value} rejects in the last batch.",
]
OBSERVATIONS = ["an intermittent grinding noise", "a burning smell", "a small oil puddle", "stuttering motion",
                "an alarm on the panel", "uneven output", "a rattle under load"]
GAUGES = ["the inlet gauge", "the outlet gauge", "the motor ammeter", "the line pressure gauge"]


def sentence(rng: random.Random, machine: str) -> str:
    return rng.choice(FILLER).format(obs=rng.choice(OBSERVATIONS), time=f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                                     gauge=rng.choice(GAUGES), value=rng.randint(2, 400), machine=machine)


def target_words(rng: random.Random) -> int:
    """Words in the log: log-normal around 55 words (about 150 tokens), clipped to the 20–1,000 token range."""
    return max(1, min(440, int(math.exp(rng.gauss(math.log(55), 1.0)))))


def example(rng: random.Random) -> dict:
    machine, fault, action = rng.choice(MACHINES), rng.choice(FAULTS), rng.choice(ACTIONS)
    words, log = target_words(rng), []
    cause = f"Technician found {fault} on {machine} and {action}."
    while sum(len(s.split()) for s in log) + 10 < words:
        log.append(sentence(rng, machine))
    log.insert(rng.randrange(len(log) + 1), cause)
    return {"messages": [
        {"role": "user", "content": "Summarise this maintenance log in one sentence:\n" + " ".join(log)},
        {"role": "assistant", "content": f"{machine[0].upper() + machine[1:]} had {fault}; the technician {action}."},
    ]}


def write(out: Path, n_train: int, n_valid: int) -> tuple[Path, Path]:
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "valid.jsonl"
    for path, n in zip(paths, (n_train, n_valid)):
        path.write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--valid", type=int, default=16)
    args = parser.parse_args(argv)
    for path in write(args.out, args.train, args.valid):
        print(path)


if __name__ == "__main__":
    main()
