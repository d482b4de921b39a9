"""The Responses API and Anthropic Messages through the gateway in front of REAL vLLM (CPU build, SmolLM2),
with the official openai and anthropic SDKs; afterwards the gateway's token counters equal vLLM's own.

previous_response_id is exercised across two deployments (the real engine and the test upstream, which
is preferred for new requests and would answer 404 for an id it did not make) and two gateway replicas
sharing Redis. vLLM stores responses only with VLLM_ENABLE_RESPONSES_API_STORE=1 (deploy/local/engines.py
sets it); when the shared engine named by VLLM_CHAT_URL runs without it, this module starts its own.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI

from tests.conftest import (
    FakeUpstream,
    GatewayProcess,
    free_port,
    metric_value,
    start_fake_upstream,
    start_gateway,
    stop,
)
from tests.redis_fixtures import RedisServer, with_redis
from tests.vllm_fixtures import chat_tokenizer, engines, vllm_counter

pytestmark = pytest.mark.vllm

REAL = "smollm2-real"


def stores_responses(url: str) -> bool:
    r = httpx.post(f"{url}/v1/responses", json={"model": "smollm2", "input": "hi", "max_output_tokens": 1},
                   timeout=120)
    r.raise_for_status()
    return httpx.get(f"{url}/v1/responses/{r.json()['id']}", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def engine(vllm: dict[str, str]) -> Iterator[str]:
    """A real chat engine that keeps stored responses: the shared one if it does, else one of our own."""
    if stores_responses(vllm["chat"]):
        yield vllm["chat"]
        return
    with open("/tmp/vllm-engine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one engine start at a time on the shared machine
        port = free_port()
        proc = engines.start_chat_engine(port, lora=False)
        url = f"http://127.0.0.1:{port}"
        try:
            engines.wait_healthy(url, timeout=900, proc=proc)
            assert stores_responses(url)
            yield url
        finally:
            engines.stop(proc)


@pytest.fixture(scope="module")
def decoy() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["smollm2"])
    yield fake
    fake.kill()


def stack(engine: str, decoy: FakeUpstream) -> dict[str, Any]:
    """smollm2 on two deployments: the test upstream first (preferred), the real engine second."""
    return {"models": {"smollm2": {
        "prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2}, "tokenizer": chat_tokenizer(),
        "deployments": [{"name": "smollm2-decoy", "url": decoy.url, "model": "smollm2"},
                        {"name": REAL, "url": engine, "model": "smollm2",
                         "timeouts": {"connect": 2, "first_token": 60, "total": 120}}]}}}


@pytest.fixture(scope="module")
def replicas(engine: str, decoy: FakeUpstream, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    cfg = with_redis(stack(engine, decoy), redis_server.url, "apis-vllm:")
    tmp = tmp_path_factory.mktemp("gw-apis-vllm")
    g1, g2 = start_gateway(tmp, cfg), start_gateway(tmp, cfg)
    yield g1, g2
    stop(g1.proc)
    stop(g2.proc)


def oai(g: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=120)


def claude(g: GatewayProcess) -> Anthropic:
    return Anthropic(base_url=g.url, api_key="unused", max_retries=0, timeout=120)


def gateway_tokens(gws: tuple[GatewayProcess, ...]) -> tuple[float, float]:
    texts = [g.metrics() for g in gws]
    return (sum(metric_value(t, "gateway_prompt_tokens_total", deployment=REAL) for t in texts),
            sum(metric_value(t, "gateway_completion_tokens_total", deployment=REAL) for t in texts))


def test_both_apis_on_real_vllm_with_exact_accounting(replicas: tuple[GatewayProcess, GatewayProcess],
                                                      engine: str, decoy: FakeUpstream, tmp_path: Path) -> None:
    g1, g2 = replicas
    before_gw = gateway_tokens(replicas)
    before_p = vllm_counter(engine, "vllm:prompt_tokens_total")
    before_g = vllm_counter(engine, "vllm:generation_tokens_total")

    # A conversation that starts on the real engine (the preferred decoy is refusing) ...
    decoy.control(fail_status=503)
    try:
        raw = oai(g1).responses.with_raw_response.create(
            model="smollm2", input="What is the capital of France?", max_output_tokens=12, temperature=0)
    finally:
        decoy.control(fail_status=0)
    first = raw.parse()
    assert raw.headers["x-gateway-deployment"] == REAL
    assert first.output_text.strip() and first.usage is not None
    assert int(raw.headers["x-gateway-prompt-tokens"]) == first.usage.input_tokens > 0
    assert int(raw.headers["x-gateway-completion-tokens"]) == first.usage.output_tokens > 0
    # ... continues on it through the other replica (which shares the id -> deployment map in Redis),
    # although new requests prefer the decoy, which does not know the id and would answer 404.
    with oai(g2).responses.with_streaming_response.create(
            model="smollm2", input="And of Germany?", max_output_tokens=10, temperature=0, stream=True,
            previous_response_id=first.id) as s:
        assert s.headers["x-gateway-deployment"] == REAL
        events = list(s.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert done.response.usage.input_tokens > first.usage.input_tokens  # the first turn is part of the prompt
    assert oai(g2).responses.retrieve(done.response.id).id == done.response.id

    # Anthropic Messages, non-stream and stream (the key travels as x-api-key; auth is off here).
    decoy.control(fail_status=503)  # keep the messages on the real engine, so vLLM's counters see them all
    try:
        msg = claude(g1).messages.create(model="smollm2", max_tokens=8,
                                         messages=[{"role": "user", "content": "Say hello."}],
                                         extra_headers={"X-Request-Id": "vllm-msg-2"})
        assert msg.content[0].type == "text" and msg.content[0].text.strip()  # type: ignore[union-attr]
        assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 8
        with claude(g2).messages.stream(model="smollm2", max_tokens=8,
                                        messages=[{"role": "user", "content": "Count to three."}]) as st:
            text = "".join(st.text_stream)
            final = st.get_final_message()
    finally:
        decoy.control(fail_status=0)
    assert text.strip() and final.usage.output_tokens > 0
    rec = g1.record("vllm-msg-2")
    assert rec["prompt_tokens"] >= msg.usage.input_tokens and rec["completion_tokens"] == msg.usage.output_tokens

    after_gw = gateway_tokens(replicas)
    after_p = vllm_counter(engine, "vllm:prompt_tokens_total")
    after_g = vllm_counter(engine, "vllm:generation_tokens_total")
    assert after_gw[0] - before_gw[0] == after_p - before_p
    assert after_gw[1] - before_gw[1] == after_g - before_g


@pytest.mark.parametrize("path,body,delta", [
    ("/v1/messages", {"messages": [{"role": "user", "content": "Write a long story about a cat."}],
                      "max_tokens": 200}, "event: content_block_delta"),
    ("/v1/responses", {"input": "Write a long story about a cat.", "instructions": "Use simple words.",
                       "max_output_tokens": 200}, "event: response.output_text.delta")])
def test_client_leaving_mid_stream_still_matches_vllms_counters(
        replicas: tuple[GatewayProcess, GatewayProcess], engine: str, decoy: FakeUpstream,
        path: str, body: dict[str, Any], delta: str) -> None:
    """Neither API carries usage on each event: the gateway drains what vLLM wrote before it saw the
    client leave, counts the output deltas, and (Responses) counts the prompt with the engine's /tokenize."""
    g1, _ = replicas
    before_gw = gateway_tokens(replicas)
    before = (vllm_counter(engine, "vllm:prompt_tokens_total"), vllm_counter(engine, "vllm:generation_tokens_total"))
    decoy.control(fail_status=503)
    try:
        seen = 0
        with httpx.stream("POST", f"{g1.url}{path}", json={"model": "smollm2", "stream": True, **body},
                          headers={"X-Request-Id": f"vllm-leave-{path[4:]}"}, timeout=120) as r:
            assert r.headers["x-gateway-deployment"] == REAL
            for line in r.iter_lines():
                seen += line.startswith(delta)
                if seen == 5:
                    break
    finally:
        decoy.control(fail_status=0)
    rec = g1.record(f"vllm-leave-{path[4:]}", timeout=15)
    assert rec["outcome"] == "client_left_midstream" and 5 <= rec["completion_tokens"] < 200
    assert_within_race(replicas, engine, before_gw, before)


RACE_GENERATION = 2  # per choice left: a step vLLM counted before the gateway read it (docs/accounting.md)


def assert_within_race(replicas: tuple[GatewayProcess, GatewayProcess], engine: str, before_gw: tuple[float, float],
                       before: tuple[float, float], prompt_race: int = 0) -> None:
    """Billed never more than vLLM counted, and never less than the documented race (docs/accounting.md)."""
    after_gw = gateway_tokens(replicas)
    after = (vllm_counter(engine, "vllm:prompt_tokens_total"), vllm_counter(engine, "vllm:generation_tokens_total"))
    prompt_gap = (after[0] - before[0]) - (after_gw[0] - before_gw[0])
    generation_gap = (after[1] - before[1]) - (after_gw[1] - before_gw[1])
    assert after[0] - before[0] > 0
    assert 0 <= prompt_gap <= prompt_race, f"prompt: vLLM {after[0] - before[0]}, billed {after_gw[0] - before_gw[0]}"
    assert 0 <= generation_gap <= RACE_GENERATION, \
        f"generation: vLLM {after[1] - before[1]}, billed {after_gw[1] - before_gw[1]}"


@pytest.mark.parametrize("case", ["continuation", "tool_output"])
def test_responses_left_early_bills_what_vllm_prefilled(replicas: tuple[GatewayProcess, GatewayProcess],
                                                        engine: str, decoy: FakeUpstream, case: str) -> None:
    """A continued conversation, and an input with a tool call and its output, left after 4 deltas: the
    prompt is the whole conversation as vLLM rendered it (once: never the template's header twice), and
    never free; a continuation may be up to its stored turn's end marker (2 tokens) below vLLM's count."""
    g1, _ = replicas
    decoy.control(fail_status=503)
    try:
        if case == "continuation":
            first = oai(g1).responses.create(model="smollm2", input="Name three animals.", max_output_tokens=24)
            body: dict[str, Any] = {"input": "Now describe each of them at length.",
                                    "previous_response_id": first.id}
        else:
            body = {"input": [{"type": "message", "role": "user", "content": "What is the weather in Paris?"},
                              {"type": "function_call", "call_id": "call_1", "name": "weather",
                               "arguments": '{"city": "Paris"}'},
                              {"type": "function_call_output", "call_id": "call_1",
                               "output": "Sunny, 21 degrees, light wind from the west."}]}
        before_gw = gateway_tokens(replicas)
        before = (vllm_counter(engine, "vllm:prompt_tokens_total"),
                  vllm_counter(engine, "vllm:generation_tokens_total"))
        seen = 0
        with httpx.stream("POST", f"{g1.url}/v1/responses", timeout=120, headers={"X-Request-Id": f"vllm-{case}"},
                          json={"model": "smollm2", "stream": True, "max_output_tokens": 200, "ignore_eos": True,
                                **body}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                seen += line.startswith("event: response.output_text.delta")
                if seen == 4:
                    break
    finally:
        decoy.control(fail_status=0)
    rec = g1.record(f"vllm-{case}", timeout=15)
    assert rec["outcome"] == "client_left_midstream" and rec["usage_reported"] is False and rec["prompt_tokens"] > 0
    assert_within_race(replicas, engine, before_gw, before, prompt_race=2 if case == "continuation" else 0)


def test_hostile_bursts_spend_at_most_the_budget_plus_one_request(engine: str, tmp_path: Path) -> None:
    """40 concurrent requests of each hostile kind, each kind its own tenant with a small daily budget:
    continuations of a long stored conversation, a route whose cheap model is down (served by the dear
    one), and text of short tokens (2,000 x "a "). Each tenant spends at most its budget plus one
    request's cost."""
    import concurrent.futures

    budget = 0.005
    kinds = ["continuation", "fallback", "short_tokens"]
    keys = [{"tenant": k, "key": f"sk-{k}"} for k in kinds]
    price = {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}
    real = {"name": "real", "url": engine, "model": "smollm2", "timeouts": {"connect": 2, "first_token": 120,
                                                                            "total": 300}}
    cfg = {"auth": {"keys": keys}, "cache": {"mode": "off"},
           "circuit_breaker": {"failures": 1000, "min_requests": 1000},
           "models": {"smollm2": {"prices": price, "tokenizer": chat_tokenizer(), "deployments": [real]},
                      "cheap": {"prices": {"prompt_per_1m": 0.01, "completion_per_1m": 0.01},
                                "tokenizer": chat_tokenizer(),
                                "deployments": [{"name": "cheap-a", "url": f"http://127.0.0.1:{free_port()}",
                                                 "model": "smollm2", "timeouts": {"connect": 0.5}}]}},
           "routes": {"assistant": {"candidates": ["cheap", "smollm2"]}},
           "tenants": {k: {"limits": {"budget_day_usd": budget}} for k in kinds}}
    g = start_gateway(tmp_path, cfg)
    try:
        def h(kind: str) -> dict[str, str]:
            return {"Authorization": f"Bearer sk-{kind}"}

        first = httpx.post(f"{g.url}/v1/responses", headers=h("continuation"), timeout=300, json={
            "model": "smollm2", "input": "a " * 1000, "max_output_tokens": 8}).json()
        calls = {
            "continuation": lambda: httpx.post(f"{g.url}/v1/responses", headers=h("continuation"), timeout=300, json={
                "model": "smollm2", "input": "go", "previous_response_id": first["id"], "max_output_tokens": 8}),
            "fallback": lambda: httpx.post(f"{g.url}/v1/chat/completions", headers=h("fallback"), timeout=300, json={
                "model": "assistant", "max_tokens": 8, "messages": [{"role": "user", "content": "b " * 1000}]}),
            "short_tokens": lambda: httpx.post(f"{g.url}/v1/chat/completions", headers=h("short_tokens"), timeout=300,
                                               json={"model": "smollm2", "max_tokens": 8, "messages": [
                                                   {"role": "user", "content": "a " * 2000}]}),
        }
        with concurrent.futures.ThreadPoolExecutor(120) as pool:
            futures = {k: [pool.submit(call) for _ in range(40)] for k, call in calls.items()}
            results = {k: [f.result() for f in fs] for k, fs in futures.items()}
        for kind in kinds:
            codes = [r.status_code for r in results[kind]]
            assert 200 in codes and set(codes) <= {200, 429}, (kind, codes)
            recs = [r for r in g.records() if r["tenant"] == kind]
            spent = sum(r["cost_usd"] for r in recs)
            one = max(r["cost_usd"] for r in recs)
            print(f"{kind}: {codes.count(200)} served, spent ${spent:.6f} of ${budget} (one request ${one:.6f})")
            assert spent <= budget + one, f"{kind}: spent {spent} of a {budget} budget"
    finally:
        stop(g.proc)
