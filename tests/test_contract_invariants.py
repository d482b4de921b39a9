"""The money invariants, run over every endpoint contract (gateway/apis/contract.py) and every ending.

One parametrized suite: for each contract the gateway declares, and each way its request can end
(complete, streamed and not; client gone mid-stream; upstream dead mid-stream; an answer without usage),
against the test upstream, whose counters play vLLM's:
- never more: the tokens billed are at most what the engine counted;
- never free: a request the engine prefilled is billed a prompt (and a cost);
- within the race: at most the documented gap below the engine's counters (docs/accounting.md);
- the reservation is an upper bound of what the engine counted;
- recording for the cache is bounded by cache.max_entry_bytes;
- tenant isolation: the engine's prefix cache is salted per tenant, and the prefix router's verdict
  for one tenant does not depend on another tenant's prompts.
A contract without samples here fails `test_every_contract_is_covered`: declaring an endpoint brings it
into this suite. The same comparisons against the real vLLM engine: tests/test_apis_vllm.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.apis.contract import CONTRACTS, EndpointContract
from gateway.apis.registry import accountant
from gateway.record import RequestRecord
from gateway.reservation import OutputBounds, reserve
from gateway.streaming import RecordingAccountant
from tests.conftest import API_KEY, KEYS, OTHER_KEY, FakeUpstream, GatewayProcess, start_fake_upstream, start_gateway

WORDS = " ".join(f"w{i}" for i in range(30))
MAX_OUT = 24
# What each contract is sent (None: the endpoint has no request body of its own, tested in its own way).
SAMPLES: dict[str, dict[str, Any] | None] = {
    "chat": {"messages": [{"role": "user", "content": WORDS}], "max_tokens": MAX_OUT},
    "completions": {"prompt": WORDS, "max_tokens": MAX_OUT},
    "embeddings": {"input": WORDS},
    "responses": {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": WORDS}]},
                            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                            {"type": "function_call_output", "call_id": "c1", "output": "forty two"}],
                  "max_output_tokens": MAX_OUT},
    "messages": {"messages": [{"role": "user", "content": WORDS}], "max_tokens": MAX_OUT},
    "tokenize": {"prompt": WORDS},
    "detokenize": {"tokens": [1, 2, 3]},
    "responses.retrieve": None,
    "responses.cancel": None,
}
A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}
GENERATING = [c for c in CONTRACTS.values() if c.billed and c.output_fields]
STREAMING = [c for c in CONTRACTS.values() if c.can_stream]
RACE_COMPLETION = 2  # per choice left: a step vLLM counted but had not written (docs/accounting.md)
RACE_PROMPT_CONTINUATION = 2  # a continuation's stored turn end marker (docs/accounting.md)


def test_every_contract_is_covered() -> None:
    assert set(SAMPLES) == set(CONTRACTS), "a new endpoint needs samples in this suite"
    for c in CONTRACTS.values():
        assert c.path.startswith("/") and c.schema is not None and c.error_body is not None
        assert c.billed or not c.output_fields, f"{c.name}: generates output but is never billed"
        assert c.can_stream or c.accountant is None


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    u = start_fake_upstream(["m1"])
    yield u
    u.kill()


@pytest.fixture(autouse=True)
def normal(up: FakeUpstream) -> Iterator[None]:
    yield
    up.control(ttft_ms=0, itl_ms=0, die_after_chunks=-1, omit_usage=False)


@pytest.fixture(scope="module")
def gw(up: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    cfg = {"auth": {"keys": KEYS}, "cache": {"mode": "off"},
           "models": {"m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                             "deployments": [{"name": "m1-a", "url": up.url, "model": "m1"}]}}}
    g = start_gateway(tmp_path_factory.mktemp("gw-invariants"), cfg)
    yield g
    g.proc.terminate()
    g.proc.wait(10)


def _send(gw: GatewayProcess, c: EndpointContract, rid: str, stream: bool, leave_after: int | None = None) -> None:
    body = {"model": "m1", **(SAMPLES[c.name] or {}), **({"stream": True} if stream else {})}
    headers = {**A, "X-Request-Id": rid}
    if not stream:
        httpx.post(gw.url + c.path, json=body, headers=headers, timeout=30)
        return
    seen = 0
    with httpx.stream("POST", gw.url + c.path, json=body, headers=headers, timeout=30) as r:
        for line in r.iter_lines():
            seen += line.startswith("data:") and ("delta" in line or '"text"' in line)
            if leave_after is not None and seen >= leave_after:
                break


def _check(up: FakeUpstream, before: dict[str, Any], rec: dict[str, Any], prompt_race: int = 0) -> None:
    after = up.counters()
    engine_prompt = after["prompt_tokens"] - before["prompt_tokens"]
    engine_gen = after["generation_tokens"] - before["generation_tokens"]
    billed_p, billed_c = rec["prompt_tokens"], rec["completion_tokens"]
    assert billed_p <= engine_prompt and billed_c <= engine_gen, "never more than the engine counted"
    assert engine_prompt - billed_p <= prompt_race, "the prompt billed is the engine's, within the race"
    assert engine_gen - billed_c <= RACE_COMPLETION, "the output billed is the engine's, within the race"
    if engine_prompt > 0:
        assert billed_p > 0 and rec["cost_usd"] > 0, "never free"


@pytest.mark.parametrize("c", GENERATING + [CONTRACTS["embeddings"]], ids=lambda c: c.name)
def test_complete_answer(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    before = up.counters()
    _send(gw, c, f"inv-done-{c.name}", stream=False)
    rec = gw.record(f"inv-done-{c.name}")
    assert rec["status"] == 200 and rec["usage_reported"] is True
    _check(up, before, rec)


@pytest.mark.parametrize("c", GENERATING, ids=lambda c: c.name)
def test_answer_without_usage(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    """An engine answer without usage: the prompt is counted as vLLM renders it, and the record says so."""
    up.control(omit_usage=True)
    before = up.counters()
    _send(gw, c, f"inv-nousage-{c.name}", stream=False)
    rec = gw.record(f"inv-nousage-{c.name}")
    assert rec["status"] == 200 and rec["usage_reported"] is False
    after = up.counters()
    assert rec["prompt_tokens"] == after["prompt_tokens"] - before["prompt_tokens"] > 0
    assert rec["cost_usd"] > 0


@pytest.mark.parametrize("c", STREAMING, ids=lambda c: c.name)
def test_complete_stream(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    before = up.counters()
    _send(gw, c, f"inv-stream-{c.name}", stream=True)
    rec = gw.record(f"inv-stream-{c.name}")
    assert rec["outcome"] == "ok" and rec["completion_tokens"] == MAX_OUT
    _check(up, before, rec)


@pytest.mark.parametrize("c", STREAMING, ids=lambda c: c.name)
def test_client_leaves_mid_stream(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    up.control(itl_ms=30)
    before = up.counters()
    _send(gw, c, f"inv-left-{c.name}", stream=True, leave_after=3)
    rec = gw.record(f"inv-left-{c.name}", timeout=10)
    assert rec["outcome"] == "client_left_midstream" and 0 < rec["completion_tokens"] < MAX_OUT
    _check(up, before, rec)


@pytest.mark.parametrize("c", STREAMING, ids=lambda c: c.name)
def test_upstream_dies_mid_stream(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    up.control(die_after_chunks=4)
    before = up.counters()
    _send(gw, c, f"inv-died-{c.name}", stream=True)
    rec = gw.record(f"inv-died-{c.name}", timeout=10)
    assert rec["outcome"] == "upstream_failed_midstream"
    _check(up, before, rec)


def test_stream_whose_terminal_event_has_no_usage(gw: GatewayProcess, up: FakeUpstream) -> None:
    """`response.completed` without usage: billed the engine's prompt, recorded as not reported by vLLM."""
    up.control(omit_usage=True)
    before = up.counters()
    _send(gw, CONTRACTS["responses"], "inv-completed-nousage", stream=True)
    rec = gw.record("inv-completed-nousage")
    assert rec["outcome"] == "ok" and rec["usage_reported"] is False
    _check(up, before, rec)


def test_continuation_left_early_is_billed_its_whole_conversation_never_more(gw: GatewayProcess,
                                                                              up: FakeUpstream) -> None:
    first = httpx.post(gw.url + "/v1/responses", headers=A, timeout=30,
                       json={"model": "m1", "input": WORDS, "max_output_tokens": MAX_OUT}).json()
    up.control(itl_ms=30)
    before = up.counters()
    body = {"model": "m1", "input": [{"type": "function_call_output", "call_id": "c", "output": "go on"}],
            "previous_response_id": first["id"], "max_output_tokens": MAX_OUT, "stream": True}
    seen = 0
    with httpx.stream("POST", gw.url + "/v1/responses", json=body, headers={**A, "X-Request-Id": "inv-cont"},
                      timeout=30) as r:
        for line in r.iter_lines():
            seen += line.startswith("data:") and "delta" in line
            if seen >= 3:
                break
    rec = gw.record("inv-cont", timeout=10)
    assert rec["outcome"] == "client_left_midstream" and rec["usage_reported"] is False
    assert rec["prompt_tokens"] > first["usage"]["total_tokens"]  # the stored conversation and the new item
    _check(up, before, rec, prompt_race=RACE_PROMPT_CONTINUATION)


# ---- the reservation bounds what the engine counts, on every contract


@pytest.mark.parametrize("c", [c for c in CONTRACTS.values() if c.billed], ids=lambda c: c.name)
def test_reservation_bounds_the_engines_count(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    body = {"model": "m1", **(SAMPLES[c.name] or {})}
    prompt, completion = reserve(dict(body), c, OutputBounds(MAX_OUT))
    before = up.counters()
    _send(gw, c, f"inv-bound-{c.name}", stream=False)
    after = up.counters()
    assert prompt >= after["prompt_tokens"] - before["prompt_tokens"]
    assert completion >= after["generation_tokens"] - before["generation_tokens"]


# ---- recording for the cache is bounded


@pytest.mark.parametrize("c", STREAMING, ids=lambda c: c.name)
def test_recording_stops_at_the_entry_bound(c: EndpointContract) -> None:
    rec = RequestRecord("r", c.name)
    acct = accountant(c, rec, True, 4096) or RecordingAccountant(rec, False, False, 1, 4096)
    event = (b'{"type": "response.output_text.delta", "delta": "' + b"x" * 500 + b'"}' if c.accountant else
             b'{"choices": [{"index": 0, "delta": {"content": "' + b"x" * 500 + b'"}}]}')
    for _ in range(100):  # 50 KB of events
        acct.on_data(event)
    kept = acct.recorded() if isinstance(acct, RecordingAccountant) else acct.payloads  # type: ignore[union-attr]
    assert kept is None, "a recording past max_entry_bytes is dropped, not kept growing"


# ---- tenant isolation


@pytest.mark.parametrize("c", GENERATING, ids=lambda c: c.name)
def test_engine_prefix_cache_is_salted_per_tenant(gw: GatewayProcess, up: FakeUpstream, c: EndpointContract) -> None:
    salts = []
    for headers in (A, B, A):
        body = {"model": "m1", **(SAMPLES[c.name] or {}), "cache_salt": "chosen-by-client"}
        httpx.post(gw.url + c.path, json=body, headers=headers, timeout=30)
        salts.append(up.state()["counters"]["last_request"].get("cache_salt"))
    assert salts[0] == salts[2] != salts[1] and "chosen-by-client" not in salts


def test_prefix_routing_verdict_does_not_depend_on_another_tenants_prompts(tmp_path_factory: pytest.TempPathFactory
                                                                          ) -> None:
    ups = [start_fake_upstream(["m1"]), start_fake_upstream(["m1"])]
    cfg = {"auth": {"keys": KEYS}, "cache": {"mode": "off"},
           "models": {"m1": {"balance": "prefix", "prefix_routing": {"block_chars": 64},
                             "deployments": [{"name": f"m1-{i}", "url": u.url, "model": "m1"}
                                             for i, u in enumerate(ups)]}}}
    g = start_gateway(tmp_path_factory.mktemp("gw-oracle"), cfg)
    try:
        secret = "CONFIDENTIAL system prompt of tenant A: " + "secret " * 40

        def ask(headers: dict[str, str], system: str) -> httpx.Response:
            return httpx.post(g.url + "/v1/chat/completions", headers=headers, timeout=30, json={
                "model": "m1", "max_tokens": 2, "messages": [{"role": "system", "content": system},
                                                             {"role": "user", "content": "hi"}]})

        for _ in range(3):
            assert ask(A, secret).headers["x-gateway-balance"] in ("new", "affinity")
        assert ask(A, secret).headers["x-gateway-balance"] == "affinity"  # A's own prompts do earn affinity
        right, wrong = ask(B, secret), ask(B, "a wrong guess " + "secret " * 40)
        assert right.headers["x-gateway-balance"] == wrong.headers["x-gateway-balance"] == "new"
        rec = g.records()[-2]
        assert rec["prefix_blocks_matched"] == 0
    finally:
        g.proc.terminate()
        g.proc.wait(10)
        for u in ups:
            u.kill()
