"""Prompt data for the load tests: a JSONL file with realistic length distributions, made from a fixed seed.

Kinds (each line: {"kind", "id", "text", "max_tokens"}):
  short     chat turns; prompt words log-normal (median ~25), answers log-normal (median ~48 tokens)
  long      long-context requests (a document + a question), 300-1000 words, short answers
  repeat    a small pool of FAQ-style prompts sent again and again with temperature 0 (cache hits)
  classify  product reviews to label positive/negative (the adapter's task), 4 answer tokens
  embed     passages for /v1/embeddings, 8-200 words (fits a 512-token embedding model)

    python -m loadtests.prompts [--out loadtests/data/prompts.jsonl] [--seed 7]

The file is made on first use if missing; the same --seed always gives the same file. Which prompt a
virtual user sends is drawn separately, from LOADTEST_SEED (see locustfile.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
KINDS = ("short", "long", "repeat", "classify", "embed")

_WORDS = (
    "the", "a", "an", "this", "that", "our", "your", "their", "model", "request", "server", "cache", "token",
    "latency", "budget", "tenant", "route", "deployment", "engine", "queue", "answer", "question", "data",
    "system", "user", "team", "product", "service", "price", "cost", "time", "week", "month", "report",
    "customer", "order", "delivery", "support", "account", "update", "error", "test", "result", "value",
    "plan", "simple", "fast", "slow", "large", "small", "new", "old", "good", "bad", "clear", "short", "long",
    "early", "late", "first", "last", "next", "explain", "describe", "compare", "summarise", "list", "write",
    "check", "find", "improve", "reduce", "measure", "choose", "keep", "is", "are", "was", "were", "has",
    "have", "will", "can", "should", "could", "may", "must", "does", "did", "makes", "takes", "gives",
    "shows", "with", "without", "for", "from", "into", "over", "under", "about", "after", "before", "during",
    "between", "across", "through", "and", "or", "but", "so", "because", "while", "when", "where", "which",
    "who", "how", "why", "what",
)
_TOPICS = ("vector databases", "unit testing", "coffee brewing", "train timetables", "tax returns",
           "garden irrigation", "password managers", "solar panels", "remote work", "bread baking",
           "container networking", "museum exhibits", "bicycle repair", "email etiquette", "sleep hygiene")
_POS = ("great", "excellent", "reliable", "delightful", "fast", "sturdy", "comfortable", "worth every penny")
_NEG = ("broken", "disappointing", "slow", "flimsy", "useless", "overpriced", "noisy", "a waste of money")
_ITEMS = ("headphones", "kettle", "backpack", "phone case", "desk lamp", "blender", "keyboard", "tent")


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def _sentence(rng: random.Random) -> str:
    n = rng.randint(6, 16)
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _text(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(_sentence(rng))
    return " ".join(out)


def make(path: Path = DEFAULT_PATH, seed: int = 7, counts: dict[str, int] | None = None) -> Path:
    rng = random.Random(seed)
    counts = counts or {"short": 400, "long": 40, "repeat": 20, "classify": 200, "embed": 200}
    rows: list[dict[str, object]] = []
    for i in range(counts["short"]):
        topic = rng.choice(_TOPICS)
        body = _text(rng, _lognormal_int(rng, 25, 0.8, 3, 300))
        rows.append({"kind": "short", "id": f"short-{i}", "text": f"About {topic}: {body}",
                     "max_tokens": _lognormal_int(rng, 48, 0.7, 4, 256)})
    for i in range(counts["long"]):
        doc = _text(rng, rng.randint(300, 1000))
        rows.append({"kind": "long", "id": f"long-{i}",
                     "text": f"Read the document and answer the question.\n\n{doc}\n\nQuestion: "
                             f"what does the document say about {rng.choice(_TOPICS)}?",
                     "max_tokens": _lognormal_int(rng, 64, 0.5, 16, 160)})
    for i in range(counts["repeat"]):
        rows.append({"kind": "repeat", "id": f"repeat-{i}",
                     "text": f"FAQ {i}: in two sentences, what is the best way to get started with "
                             f"{_TOPICS[i % len(_TOPICS)]}?", "max_tokens": 32})
    for i in range(counts["classify"]):
        good = rng.random() < 0.5
        words = rng.sample(_POS if good else _NEG, 2)
        rows.append({"kind": "classify", "id": f"classify-{i}", "label": "positive" if good else "negative",
                     "text": f"Review: The {rng.choice(_ITEMS)} is {words[0]} and {words[1]}. "
                             f"{_text(rng, _lognormal_int(rng, 20, 0.6, 0, 80))}\nSentiment:",
                     "max_tokens": 4})
    for i in range(counts["embed"]):
        rows.append({"kind": "embed", "id": f"embed-{i}", "text": _text(rng, _lognormal_int(rng, 40, 0.8, 8, 200)),
                     "max_tokens": 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def load(path: Path | str | None = None) -> dict[str, list[dict[str, object]]]:
    """Prompts by kind; makes the default file first if it is missing."""
    p = Path(path) if path else DEFAULT_PATH
    if not p.exists():
        make(p)
    out: dict[str, list[dict[str, object]]] = {k: [] for k in KINDS}
    for line in p.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(str(row["kind"]), []).append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    path = make(a.out, a.seed)
    rows = load(path)
    for kind, items in rows.items():
        words = sorted(len(str(r["text"]).split()) for r in items)
        if words:
            print(f"{kind:9} n={len(words):4}  words p50={words[len(words) // 2]:5}  max={words[-1]:5}")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
