"""Automatic task routing (`task_auto`), against real HTTP test upstreams: the classifier's threshold, the
fallback when the embedding model is down or slow, the accounting of routing tokens, declared tasks winning.

The test upstream's embeddings are its words hashed into signed buckets (gateway/testing/fake_vllm.py),
so texts that share words are close and the classifier learns from the examples as it does from MiniLM's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.config import ConfigError, parse_config
from gateway.money import usd_text
from gateway.prompt_tokens import Conversation
from gateway.routing.task_auto import fit_logistic, last_user_text
from tests.conftest import FakeUpstream, GatewayProcess, metric_value, start_fake_upstream

ITEMS = ["the pizza", "this phone", "the hotel", "the movie", "the delivery", "this laptop", "the concert",
         "the book", "the coffee", "the headphones"]
POSITIVE = ["Is this review positive or negative? Review: {i} was great.",
            "Classify the sentiment of this review: {i} was awful.",
            "What is the sentiment of: I loved {i}.",
            "Tell me if this customer review is positive or negative: {i} broke after a day."]
NEGATIVE = ["Write a positive review of {i}.", "Write a short story about {i}.",
            "Explain how {i} is made.", "Write a negative review of {i} for a blog.",
            "Give me three fun facts about {i}."]
SENTIMENT_TEXT = "Is this review positive or negative? Review: the sofa was great."
GENERATION_TEXT = "Write a short story about the sofa."
PRICES = {"big": (10, 30), "nlu": (0.5, 1), "emb": (0.1, 0)}  # USD per 1M prompt, completion tokens


def examples_file(tmp: Path) -> Path:
    path = tmp / "sentiment-examples.jsonl"
    rows = [{"text": t.format(i=i), "match": True} for t in POSITIVE for i in ITEMS]
    rows += [{"text": t.format(i=i), "match": False} for t in NEGATIVE for i in ITEMS]
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return path


def config(chat_url: str, emb_url: str, examples: Path, **auto: Any) -> dict[str, Any]:
    return {
        "models": {
            "big": {"prices": {"prompt_per_1m": 10, "completion_per_1m": 30},
                    "deployments": [{"name": "big-0", "url": chat_url, "model": "big-base"}]},
            "nlu": {"prices": {"prompt_per_1m": 0.5, "completion_per_1m": 1}, "tier": "adapter",
                    "deployments": [{"name": "nlu-0", "url": chat_url, "model": "nlu-adapter"}]},
            "emb": {"prices": {"prompt_per_1m": 0.1}, "tier": "small",
                    "deployments": [{"name": "emb-0", "url": emb_url, "model": "emb",
                                     "timeouts": {"connect": 1, "first_token": 5, "total": 10}}]},
        },
        "routes": {"assistant": {"candidates": ["big", "nlu"], "tasks": {"sentiment": "nlu"},
                                 "task_auto": {"embedding": "emb", "examples": {"sentiment": str(examples)},
                                               "threshold": 0.8, "deadline_ms": 2000, **auto}}},
        "cache": {"mode": "off"},
    }


@pytest.fixture(scope="module")
def chat_up() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["big-base", "nlu-adapter"])
    yield fake
    fake.kill()


@pytest.fixture
def emb_up() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["emb"])
    yield fake
    fake.kill()


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    return examples_file(tmp_path)


def ask(gw: GatewayProcess, text: str, stream: bool = False, rid: str | None = None,
        body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    payload = {"model": "assistant", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": text}],
               "max_tokens": 3, "stream": stream, **(body or {})}
    h = {"Content-Type": "application/json", **headers}
    if rid:
        h["X-Request-Id"] = rid
    return httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(payload), headers=h, timeout=30)


def wait_ready(gw: GatewayProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_value(gw.metrics(), "gateway_task_classifier_ready", route="assistant") == 1:
            return
        time.sleep(0.1)
    raise AssertionError("the task classifier was not fitted in time")


def decisions(gw: GatewayProcess, **labels: str) -> float:
    return metric_value(gw.metrics(), "gateway_route_decisions_total", route="assistant", rule="task_auto", **labels)


@pytest.fixture
def auto_gw(gateway_factory: Callable[..., GatewayProcess], chat_up: FakeUpstream, emb_up: FakeUpstream,
            examples: Path) -> GatewayProcess:
    gw = gateway_factory(config(chat_up.url, emb_up.url, examples))
    wait_ready(gw)
    return gw


# ====================================================================== the classifier alone


def test_logistic_fit_separates_and_is_calibrated_between() -> None:
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(1, 0.3, (40, 5)), rng.normal(-1, 0.3, (60, 5))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([1.0] * 40 + [0.0] * 60)
    w = fit_logistic(x, y, l2=0.1)
    p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
    assert (p[:40] > 0.9).all() and (p[40:] < 0.1).all()
    mid = np.zeros(5)  # as far from both classes: no confidence either way
    assert 0.2 < 1 / (1 + np.exp(-(mid @ w[:-1] + w[-1]))) < 0.8


def test_the_text_decided_on_is_the_last_user_turn() -> None:
    conv = Conversation(messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                                  {"role": "user", "content": [{"type": "text", "text": "second"}]},
                                  {"role": "assistant", "content": "y"}])
    assert last_user_text(conv) == "second"
    assert last_user_text(Conversation(texts=["a prompt"])) == "a prompt"
    assert last_user_text(Conversation(messages=[{"role": "system", "content": "only system"}])) is None


def test_config_rejects_examples_that_cannot_train(tmp_path: Path, examples: Path) -> None:
    cfg = config("http://127.0.0.1:1", "http://127.0.0.1:2", examples)
    parse_config(orjson.dumps(cfg).decode(), "t.yaml")  # valid as written
    bad = orjson.loads(orjson.dumps(cfg))
    bad["routes"]["assistant"]["task_auto"]["examples"] = {"ner": str(examples)}
    with pytest.raises(ConfigError, match="not in the route's tasks"):
        parse_config(orjson.dumps(bad).decode(), "t.yaml")
    only_positive = tmp_path / "pos.jsonl"
    only_positive.write_text('{"text": "classify this", "match": true}\n')
    bad["routes"]["assistant"]["task_auto"]["examples"] = {"sentiment": str(only_positive)}
    with pytest.raises(ConfigError, match="match: false"):
        parse_config(orjson.dumps(bad).decode(), "t.yaml")
    bad["routes"]["assistant"]["task_auto"]["examples"] = {"sentiment": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(orjson.dumps(bad).decode(), "t.yaml")


# ====================================================================== through the gateway


def test_task_requests_go_to_the_task_model_and_the_rest_stays(auto_gw: GatewayProcess, emb_up: FakeUpstream) -> None:
    r = ask(auto_gw, SENTIMENT_TEXT, rid="auto-1")
    assert r.status_code == 200, r.text
    h = r.headers
    assert h["x-gateway-model"] == "nlu" and h["x-gateway-rule"] == "task_auto" and h["x-gateway-task"] == "sentiment"
    assert h["x-gateway-task-decision"] == "routed" and float(h["x-gateway-task-confidence"]) >= 0.8
    g = ask(auto_gw, GENERATION_TEXT, rid="auto-2")
    assert g.status_code == 200 and g.headers["x-gateway-model"] == "big"
    assert g.headers["x-gateway-task-decision"] == "below_threshold"
    assert float(g.headers["x-gateway-task-confidence"]) < 0.8 and "x-gateway-task" not in g.headers
    rec = auto_gw.record("auto-1")
    assert rec["rule"] == "task_auto" and rec["task"] == "sentiment" and rec["task_decision"] == "routed"
    assert rec["route_decisions"][0].startswith("task_auto: routed sentiment p=")
    assert decisions(auto_gw, task="sentiment", outcome="routed") == 1
    assert decisions(auto_gw, task="none", outcome="below_threshold") == 1
    m = auto_gw.metrics()
    assert metric_value(m, "gateway_task_confidence_count", route="assistant") == 2
    assert metric_value(m, "gateway_routing_seconds_count", route="assistant") == 2
    assert metric_value(m, "gateway_fallbacks_total", from_model="big", to_model="nlu", reason="task_auto") == 1


def test_routing_tokens_are_accounted(auto_gw: GatewayProcess, emb_up: FakeUpstream) -> None:
    emb_up.control(reset_counters=True)
    r = ask(auto_gw, SENTIMENT_TEXT, rid="acct-1")
    assert r.status_code == 200
    embedded = emb_up.counters()["prompt_tokens"]  # what the embedding engine counted for this request
    assert embedded == len(SENTIMENT_TEXT.split()) + 1
    h, rec = r.headers, auto_gw.record("acct-1")
    assert int(h["x-gateway-routing-tokens"]) == rec["routing_tokens"] == embedded
    routing_pico = embedded * 100_000  # 0.1 USD per 1M tokens = 1e5 pico-USD a token
    assert rec["routing_cost_pico_usd"] == routing_pico and h["x-gateway-routing-cost-usd"] == usd_text(routing_pico)
    p, c = rec["prompt_tokens"], rec["completion_tokens"]
    served = p * 500_000 + c * 1_000_000  # nlu's prices
    assert rec["cost_pico_usd"] == served + routing_pico  # deciding is part of the request's cost
    assert rec["counterfactual_cost_pico_usd"] == p * 10_000_000 + c * 30_000_000  # big's, without routing
    assert 0 < rec["routing_ms"] < 2000 and float(h["x-gateway-routing-ms"]) == pytest.approx(rec["routing_ms"])
    m = auto_gw.metrics()
    assert metric_value(m, "gateway_routing_tokens_total", route="assistant", purpose="request") == embedded
    assert metric_value(m, "gateway_routing_tokens_total", route="assistant", purpose="examples") > 0
    assert metric_value(m, "gateway_task_auto_cost_usd_total", route="assistant", kind="routing") == \
        pytest.approx(routing_pico / 1e12)
    assert metric_value(m, "gateway_task_auto_cost_usd_total", route="assistant", kind="billed") == \
        pytest.approx((served + routing_pico) / 1e12)
    # a stream is decided the same way and says so in its first headers
    s = ask(auto_gw, SENTIMENT_TEXT, stream=True)
    assert s.status_code == 200 and s.headers["x-gateway-model"] == "nlu"
    assert s.headers["x-gateway-task-decision"] == "routed" and s.text.rstrip().endswith("data: [DONE]")


def test_declared_task_overrides_auto(auto_gw: GatewayProcess, emb_up: FakeUpstream) -> None:
    emb_up.control(reset_counters=True)
    r = ask(auto_gw, GENERATION_TEXT, rid="decl-1", **{"x-gateway-task": "sentiment"})
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "nlu"
    assert r.headers["x-gateway-rule"] == "task" and r.headers["x-gateway-task-decision"] == "declared"
    chat = ask(auto_gw, SENTIMENT_TEXT, body={"metadata": {"task": "chat"}})
    assert chat.status_code == 200 and chat.headers["x-gateway-model"] == "big"
    assert chat.headers["x-gateway-task-decision"] == "declared"
    assert emb_up.counters()["requests"] == 0  # a declared task costs no classification
    rec = auto_gw.record("decl-1")
    assert rec["routing_tokens"] == 0 and rec["routing_cost_pico_usd"] == 0 and rec["task_confidence"] is None
    assert decisions(auto_gw, outcome="declared") == 2


def test_threshold_decides(gateway_factory: Callable[..., GatewayProcess], chat_up: FakeUpstream,
                           emb_up: FakeUpstream, examples: Path) -> None:
    low = gateway_factory(config(chat_up.url, emb_up.url, examples, threshold=0.5))
    wait_ready(low)
    r = ask(low, SENTIMENT_TEXT)
    p = float(r.headers["x-gateway-task-confidence"])
    assert r.headers["x-gateway-model"] == "nlu" and 0.5 <= p < 1
    # the same request, the same probability: above a threshold just below it, below one just above it
    below = gateway_factory(config(chat_up.url, emb_up.url, examples, threshold=round(p - 0.0002, 4)))
    above = gateway_factory(config(chat_up.url, emb_up.url, examples, threshold=round(p + 0.0002, 4)))
    wait_ready(below)
    wait_ready(above)
    assert ask(below, SENTIMENT_TEXT).headers["x-gateway-model"] == "nlu"
    a = ask(above, SENTIMENT_TEXT)
    assert a.status_code == 200 and a.headers["x-gateway-model"] == "big"
    assert a.headers["x-gateway-task-decision"] == "below_threshold"
    assert float(a.headers["x-gateway-task-confidence"]) == pytest.approx(p, abs=1e-4)


def test_embedding_model_down_or_failing_takes_the_default_route(auto_gw: GatewayProcess,
                                                                 emb_up: FakeUpstream) -> None:
    emb_up.control(fail_status=503)
    r = ask(auto_gw, SENTIMENT_TEXT, rid="down-1")
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "big"
    assert r.headers["x-gateway-task-decision"] == "unavailable" and "x-gateway-rule" not in r.headers
    emb_up.kill()  # the engine gone: connection refused, then marked unhealthy by the health check
    for i in range(5):
        r = ask(auto_gw, SENTIMENT_TEXT, rid=f"down-{i + 2}")
        assert r.status_code == 200 and r.headers["x-gateway-model"] == "big"
        assert r.headers["x-gateway-task-decision"] == "unavailable"
        time.sleep(0.3)
    rec = auto_gw.record("down-6")
    assert rec["routing_tokens"] == 0 and rec["routing_cost_pico_usd"] == 0
    assert rec["cost_pico_usd"] == rec["counterfactual_cost_pico_usd"] > 0
    assert decisions(auto_gw, task="none", outcome="unavailable") == 6
    assert metric_value(auto_gw.metrics(), "gateway_requests_total", status="200") == 6


def test_a_slow_embedding_model_misses_its_deadline(gateway_factory: Callable[..., GatewayProcess],
                                                    chat_up: FakeUpstream, emb_up: FakeUpstream,
                                                    examples: Path) -> None:
    gw = gateway_factory(config(chat_up.url, emb_up.url, examples, deadline_ms=150))
    wait_ready(gw)
    emb_up.control(ttft_ms=5000)
    t0 = time.monotonic()
    r = ask(gw, SENTIMENT_TEXT, rid="slow-1")
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "big"
    assert r.headers["x-gateway-task-decision"] == "deadline"
    assert took < 3.0  # the request did not wait for the embedding
    rec = gw.record("slow-1")
    assert 140 <= rec["routing_ms"] < 2500 and rec["routing_tokens"] == 0
    assert decisions(gw, outcome="deadline") == 1
    assert metric_value(gw.metrics(), "gateway_routing_seconds_count", route="assistant") == 1


def test_requests_before_the_classifier_is_fitted_take_the_default_route(
        gateway_factory: Callable[..., GatewayProcess], chat_up: FakeUpstream, examples: Path) -> None:
    emb = start_fake_upstream(["emb"])
    try:
        emb.control(fail_status=503)  # the embedding engine is not serving yet when the gateway starts
        gw = gateway_factory(config(chat_up.url, emb.url, examples))
        r = ask(gw, SENTIMENT_TEXT)
        assert r.status_code == 200 and r.headers["x-gateway-model"] == "big"
        assert r.headers["x-gateway-task-decision"] == "not_ready"
        assert metric_value(gw.metrics(), "gateway_task_classifier_ready", route="assistant") == 0
        emb.control(fail_status=0)  # it comes up: the gateway's next fitting attempt succeeds
        wait_ready(gw, timeout=30)
        assert ask(gw, SENTIMENT_TEXT).headers["x-gateway-model"] == "nlu"
        assert decisions(gw, outcome="not_ready") == 1 and decisions(gw, outcome="routed") == 1
    finally:
        emb.kill()


def test_report_sweep_serves_each_request_by_the_model_its_confidence_picks() -> None:
    from loadtests.task_routing import answer_label, summarise, sweep

    def row(mode: str, task: str | None, served: str, answer: str, cost: float, conf: float | None = None,
            label: str | None = None) -> dict[str, Any]:
        return {"mode": mode, "kind": "sentiment" if task else "chat", "task": task, "label": label, "status": 200,
                "e2e_s": 0.1, "served": served, "decision": None if conf is None else "x", "confidence": conf,
                "routing_ms": 5.0, "routing_cost_usd": 0.0 if conf is None else 1e-9, "cost_usd": cost,
                "answer": answer}

    llm, ad = "smollm2", "sentiment"
    by_mode = {  # request 1: sentiment (positive), request 2: chat
        "always-LLM": [row("l", ad, llm, "other", 10e-6, label="positive"), row("l", None, llm, "", 8e-6)],
        "adapter": [row("a", ad, ad, "positive", 1e-6, label="positive"), row("a", None, ad, "", 2e-6)],
        "auto": [row("x", ad, ad, "positive", 1e-6, 0.9, "positive"), row("x", None, llm, "", 8e-6, 0.3)],
    }
    points = {p["threshold"]: p for p in sweep(by_mode)}
    assert points[0.5]["accuracy"] == 1 and points[0.5]["precision"] == 1 and points[0.5]["recall"] == 1
    assert points[0.5]["cost_per_request_usd"] == pytest.approx((1e-6 + 8e-6 + 2e-9) / 2)
    assert points[0.95]["accuracy"] == 0 and points[0.95]["recall"] == 0  # all on the LLM
    assert points[0.2]["precision"] == 0.5 and points[0.2]["cost_per_request_usd"] == pytest.approx(
        (1e-6 + 2e-6 + 2e-9) / 2)  # the chat request on the adapter too, at its measured cost
    s = summarise(by_mode["auto"])
    assert s["recall"] == 1 and s["precision"] == 1 and s["accuracy"] == 1 and s["routed_share"] == 0.5
    assert answer_label(" Positive.") == "positive" and answer_label("positive or negative") == "other"
