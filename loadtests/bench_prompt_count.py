"""What counting a prompt costs per request, and how tight each reservation is (issue 22).

    .venv/bin/python -m loadtests.bench_prompt_count [--tokenizer FOLDER] [--rounds 3]

On loadtests/data/prompts.jsonl (860 prompts), each sent as a chat request behind one shared system prompt
(as an application sends them): the CPU time of the reservation's prompt bound per request with the byte
bound (no tokenizer configured) and with the model's tokenizer and chat template (first sight of each
prompt, then the same requests again: the system prompt and resent turns are remembered pieces), and the
median and maximum of reserved / actual, where actual is the tokenizer's exact count (vLLM's count for
text: tests/test_prompt_bound_vllm.py checks that against the engine). The tokenizer folder defaults to
the one the local chat engine serves SmolLM2 from (deploy/local/engines.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from gateway.apis.contract import CONTRACTS
from gateway.prompt_tokens import BYTE_BOUND, PromptCounter, Tokenizer
from gateway.reservation import OutputBounds, prompt_bound

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
SYSTEM = ("You are the support assistant of a bicycle shop. Answer briefly, politely and only about the shop's "
          "products, repairs and opening hours. ") * 4
BOUNDS = OutputBounds(1)


def bodies() -> list[dict[str, Any]]:
    out = []
    for line in PROMPTS.read_text().splitlines():
        text = json.loads(line)["text"]
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]})
    return out


def per_request_us(reqs: list[dict[str, Any]], counter: PromptCounter) -> float:
    t0 = time.process_time()
    for body in reqs:
        prompt_bound(body, CONTRACTS["chat"], BOUNDS, [counter])
    return (time.process_time() - t0) / len(reqs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json and the chat template")
    ap.add_argument("--rounds", type=int, default=3, help="repeat each measurement, report the median")
    args = ap.parse_args()
    folder = args.tokenizer
    if folder is None:
        from deploy.local import engines
        folder = str(engines.manifest()["chat_model"])
    reqs = bodies()
    chat = CONTRACTS["chat"]

    byte_us = statistics.median(per_request_us(reqs, BYTE_BOUND) for _ in range(args.rounds))
    cold, warm = [], []
    for _ in range(args.rounds):
        counter = PromptCounter(Tokenizer(folder))  # a fresh piece cache: every prompt seen for the first time
        cold.append(per_request_us(reqs, counter))
        warm.append(per_request_us(reqs, counter))  # the same requests again: every piece remembered
    exact = PromptCounter(Tokenizer(folder))
    actual = [exact.exact(chat.conversation(b)) or 0 for b in reqs]
    ratios: dict[str, list[float]] = {"bytes": [], "tokenizer": []}
    for body, n in zip(reqs, actual, strict=True):
        ratios["bytes"].append(prompt_bound(body, chat, BOUNDS, [BYTE_BOUND]) / n)
        ratios["tokenizer"].append(prompt_bound(body, chat, BOUNDS, [exact]) / n)
        assert ratios["tokenizer"][-1] >= 1 and ratios["bytes"][-1] >= 1, "a bound below the count"

    print(f"{len(reqs)} chat requests (system prompt + one prompt of prompts.jsonl), "
          f"actual prompt tokens median {statistics.median(actual)}, "
          f"{args.rounds} rounds, CPU us per request (median of rounds):")
    print(f"  byte bound (no tokenizer)          {byte_us:8.1f} us   reserved/actual median "
          f"{statistics.median(ratios['bytes']):.3f}  max {max(ratios['bytes']):.3f}")
    print(f"  tokenizer, first sight of prompts  {statistics.median(cold):8.1f} us   reserved/actual median "
          f"{statistics.median(ratios['tokenizer']):.3f}  max {max(ratios['tokenizer']):.3f}")
    print(f"  tokenizer, prompts seen before     {statistics.median(warm):8.1f} us")


if __name__ == "__main__":
    main()
