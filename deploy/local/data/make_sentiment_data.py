#!/usr/bin/env python3
"""Generate the small labelled sentiment data set used to train the LoRA adapter.

Synthetic, written for this project: short product/service/media review sentences assembled from
hand-written templates and phrase lists below (no external data, no model output). Deterministic
(fixed seed), so re-running reproduces sentiment.jsonl byte-for-byte. Each line:
  {"text": ..., "label": "positive"|"negative", "split": "train"|"heldout"}
The held-out split is fixed: a seeded 25% of the examples, and it also holds examples built from two
templates (T_HELDOUT) never seen in training, to check the adapter generalises beyond the templates.

Run:  python deploy/local/data/make_sentiment_data.py   (writes sentiment.jsonl next to this file)
"""
import json
import random
from pathlib import Path

SEED = 20261126
N_PER_TEMPLATE = 32

SUBJECTS = [
    "the movie", "this phone", "the hotel room", "the pasta", "the customer service", "this laptop",
    "the concert", "the book", "the delivery", "this vacuum cleaner", "the app", "the coffee",
    "the hiking boots", "the museum tour", "the headphones", "the pizza", "the flight", "this game",
    "the sofa", "the tutorial", "the rental car", "the haircut", "the keyboard", "the sequel",
]
POS_ADJ = ["excellent", "wonderful", "fantastic", "great", "delightful", "superb", "reliable",
           "impressive", "charming", "comfortable", "brilliant", "lovely", "outstanding", "solid"]
NEG_ADJ = ["terrible", "awful", "disappointing", "broken", "boring", "overpriced", "unreliable",
           "mediocre", "flimsy", "dreadful", "useless", "painful", "sloppy", "frustrating"]
POS_VERB = ["loved", "enjoyed", "adored", "was thrilled with", "really liked", "was impressed by"]
NEG_VERB = ["hated", "regretted buying", "was let down by", "could not stand", "disliked",
            "was annoyed by"]
POS_DETAIL = ["worked perfectly from day one", "exceeded my expectations", "was worth every penny",
              "made my week", "arrived early and in perfect shape", "is something I would buy again",
              "kept me smiling the whole time", "was easy to use", "left me wanting more"]
NEG_DETAIL = ["stopped working after two days", "fell short of my expectations",
              "was a waste of money", "ruined my evening", "arrived late and damaged",
              "is something I will never buy again", "made me want to leave early",
              "was confusing to use", "left me with a headache"]
POS_ENDING = ["Highly recommended.", "Five stars.", "I will definitely come back.",
              "I told all my friends about it.", "Best purchase this year."]
NEG_ENDING = ["Avoid it.", "One star.", "I want a refund.", "Never again.",
              "I warned all my friends about it."]

# (template, label) pairs; fields filled from the lists above.
TEMPLATES = [
    ("{S} was {PA}.", "positive"),
    ("{S} was {NA}.", "negative"),
    ("I {PV} {s}. {PE}", "positive"),
    ("I {NV} {s}. {NE}", "negative"),
    ("Honestly, {s} {PD}.", "positive"),
    ("Honestly, {s} {ND}.", "negative"),
    ("I expected it to be {NA}, but {s} was {PA}.", "positive"),
    ("I expected it to be {PA}, but {s} was {NA}.", "negative"),
    ("{S} was not {NA} at all; it {PD}.", "positive"),
    ("{S} was not {PA} at all; it {ND}.", "negative"),
    ("Despite a slow start, {s} {PD}.", "positive"),
    ("The reviews were glowing, yet {s} {ND}.", "negative"),
]
T_HELDOUT = [
    ("My partner and I agreed that {s} was {PA} and {PD2}.", "positive"),
    ("My partner and I agreed that {s} was {NA} and {ND2}.", "negative"),
]


def _fill(rng: random.Random, tpl: str) -> str:
    s = rng.choice(SUBJECTS)
    pd, nd = rng.sample(POS_DETAIL, 2), rng.sample(NEG_DETAIL, 2)
    text = tpl.format(
        S=s[0].upper() + s[1:], s=s, PA=rng.choice(POS_ADJ), NA=rng.choice(NEG_ADJ),
        PV=rng.choice(POS_VERB), NV=rng.choice(NEG_VERB), PD=pd[0], ND=nd[0], PD2=pd[1], ND2=nd[1],
        PE=rng.choice(POS_ENDING), NE=rng.choice(NEG_ENDING),
    )
    return text


def build() -> list[dict]:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[dict] = []
    for templates, forced_split in ((TEMPLATES, None), (T_HELDOUT, "heldout")):
        for tpl, label in templates:
            n, tries = 0, 0
            while n < N_PER_TEMPLATE and tries < 1000:
                tries += 1
                text = _fill(rng, tpl)
                if text in seen:
                    continue
                seen.add(text)
                split = forced_split or ("heldout" if rng.random() < 0.25 else "train")
                rows.append({"text": text, "label": label, "split": split})
                n += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = build()
    out = Path(__file__).with_name("sentiment.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[(r["split"], r["label"])] = counts.get((r["split"], r["label"]), 0) + 1
    print(f"wrote {len(rows)} examples to {out}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
