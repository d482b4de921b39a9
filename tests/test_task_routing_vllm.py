"""Automatic task routing on the REAL engines: MiniLM embeddings decide, the LoRA adapter answers.

The classifier is fitted on deploy/local/data/task_examples/sentiment.jsonl through the real embedding
engine; requests from the held-out test mix (loadtests/data/task_mix.jsonl) check its decisions, and the
routing tokens are checked against what the embedding engine itself reports for the same text.
The full measurement (precision, recall, accuracy, cost, latency, outage) is `python -m loadtests.task_routing`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, GatewayProcess, metric_value, start_gateway, stop
from tests.vllm_fixtures import stack_config

pytestmark = pytest.mark.vllm

EXAMPLES = ROOT / "deploy" / "local" / "data" / "task_examples" / "sentiment.jsonl"
MIX = [json.loads(line) for line in (ROOT / "loadtests" / "data" / "task_mix.jsonl").read_text().splitlines()]


def auto_config(chat: str, embed: str) -> dict[str, Any]:
    cfg = stack_config(chat, embed)
    cfg["routes"]["assistant"]["tasks"]["sentiment"] = "sentiment"
    # a generous deadline: this test checks decisions; the deadline's own behaviour is in test_task_routing.py
    cfg["routes"]["assistant"]["task_auto"] = {"embedding": "minilm", "examples": {"sentiment": str(EXAMPLES)},
                                               "threshold": 0.8, "deadline_ms": 5000}
    cfg["cache"] = {"mode": "off"}
    return cfg


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = start_gateway(tmp_path_factory.mktemp("gw-task-vllm"), auto_config(vllm["chat"], vllm["embed"]))
    deadline = time.monotonic() + 300
    while metric_value(g.metrics(), "gateway_task_classifier_ready", route="assistant") != 1:
        assert time.monotonic() < deadline, "the classifier was not fitted on the real embedding engine"
        time.sleep(0.5)
    yield g
    stop(g.proc)


def ask(gw: GatewayProcess, text: str, max_tokens: int, rid: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=120, headers={"X-Request-Id": rid},
                      json={"model": "assistant", "temperature": 0, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": text}]})


def test_held_out_requests_are_decided_by_their_text(gw: GatewayProcess) -> None:
    sentiment = [r for r in MIX if r["kind"] == "sentiment"][:6]
    others = [r for r in MIX if r["kind"] == "chat"][:2] + [r for r in MIX if r["kind"] == "generation"][:2]
    routed = correct = 0
    for i, row in enumerate(sentiment):
        r = ask(gw, row["text"], 4, f"tv-s{i}")
        assert r.status_code == 200, r.text
        if r.headers["x-gateway-model"] == "sentiment":
            routed += 1
            assert r.headers["x-gateway-rule"] == "task_auto" and r.headers["x-gateway-upstream-model"] == "sentiment"
            correct += row["label"] in (r.json()["choices"][0]["message"]["content"] or "").lower()
    assert routed >= 5 and correct >= routed - 1  # the full mix: docs/benchmarks.md
    for i, row in enumerate(others):
        r = ask(gw, row["text"], 4, f"tv-o{i}")
        assert r.status_code == 200 and r.headers["x-gateway-model"] == "smollm2", row["text"]
        assert r.headers["x-gateway-task-decision"] == "below_threshold"


def test_routing_tokens_are_what_the_embedding_engine_counts(gw: GatewayProcess, vllm: dict[str, str]) -> None:
    text = next(r["text"] for r in MIX if r["kind"] == "sentiment")
    r = ask(gw, text, 2, "tv-acct")
    assert r.status_code == 200
    direct = httpx.post(f"{vllm['embed']}/v1/embeddings", json={"model": "minilm", "input": [text]}, timeout=30)
    expected = direct.json()["usage"]["prompt_tokens"]
    rec = gw.record("tv-acct")
    assert rec["routing_tokens"] == int(r.headers["x-gateway-routing-tokens"]) == expected
    assert rec["routing_cost_pico_usd"] == expected * 10_000  # minilm: 0.01 USD per 1M tokens
    served = rec["prompt_tokens"] * 50_000 + rec["completion_tokens"] * 100_000  # the adapter's prices
    assert rec["cost_pico_usd"] == served + rec["routing_cost_pico_usd"]
    assert rec["counterfactual_cost_pico_usd"] == rec["prompt_tokens"] * 100_000 + rec["completion_tokens"] * 200_000
    assert rec["routing_ms"] > 0 and rec["task_decision"] == "routed" and rec["task_confidence"] >= 0.8

