"""Responses API and Anthropic Messages through the gateway, against the test upstream: accounting, errors
in each API's shape, faults (death mid-stream, engine error events, first-token timeout fallback), cache,
and the tokenizer pass-through. The same APIs against real vLLM: tests/test_apis_vllm.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI

from tests.conftest import (
    API_KEY,
    KEYS,
    FakeUpstream,
    GatewayProcess,
    metric_value,
    start_fake_upstream,
    start_gateway,
    stop,
)

TEXT = "".join(f"tok{i} " for i in range(5))


@pytest.fixture(scope="module")
def ups() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    a, b = start_fake_upstream(["m1"]), start_fake_upstream(["m1"])
    yield a, b
    a.kill()
    b.kill()


@pytest.fixture(autouse=True)
def normal(ups: tuple[FakeUpstream, FakeUpstream]) -> Iterator[None]:
    yield
    for u in ups:
        u.control(ttft_ms=0, itl_ms=0, fail_status=0, die_after_chunks=-1, malformed_after_chunks=-1,
                  omit_usage=False, error_event_after_chunks=-1, stall_after_chunks=-1, healthy=True)


def config(*urls: str, first_token: float = 5.0, **extra: Any) -> dict[str, Any]:
    return {"auth": {"keys": KEYS},
            "models": {"m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                              "deployments": [{"name": f"m1-{i}", "url": u, "model": "m1",
                                               "timeouts": {"first_token": first_token}}
                                              for i, u in enumerate(urls)]}},
            **extra}


@pytest.fixture(scope="module")
def gw(ups: tuple[FakeUpstream, FakeUpstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = start_gateway(tmp_path_factory.mktemp("gw-apis"), config(ups[0].url, limits={"default_max_tokens": 6}))
    yield g
    stop(g.proc)


def oai(g: GatewayProcess, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=30)


def claude(g: GatewayProcess, key: str = API_KEY) -> Anthropic:
    return Anthropic(base_url=g.url, api_key=key, max_retries=0, timeout=30)


def tokens_delta(before: str, after: str, name: str) -> float:
    return metric_value(after, name, model="m1") - metric_value(before, name, model="m1")


# ---------------------------------------------------------------------- Responses API
def test_responses_non_stream_usage_headers_log_metrics_agree(gw: GatewayProcess,
                                                              ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    before, up0 = gw.metrics(), ups[0].counters()
    raw = oai(gw).responses.with_raw_response.create(model="m1", input="one two three", max_output_tokens=5,
                                                     extra_headers={"X-Request-Id": "resp-ns-1"})
    r = raw.parse()
    assert r.output_text == TEXT and r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (9, 5)
    assert r.id.startswith("resp_") and r.id == ups[0].counters()["last_request"]["request_id"]
    h = raw.headers
    assert (h["x-gateway-prompt-tokens"], h["x-gateway-completion-tokens"]) == ("9", "5")
    assert float(h["x-gateway-cost-usd"]) == pytest.approx((9 * 1.0 + 5 * 2.0) / 1e6)
    rec = gw.record("resp-ns-1")
    assert rec["endpoint"] == "responses" and rec["outcome"] == "ok" and rec["status"] == 200
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (9, 5)
    after, up1 = gw.metrics(), ups[0].counters()
    assert tokens_delta(before, after, "gateway_prompt_tokens_total") == up1["prompt_tokens"] - up0["prompt_tokens"]
    assert tokens_delta(before, after, "gateway_completion_tokens_total") == \
        up1["generation_tokens"] - up0["generation_tokens"] == 5


def test_responses_stream_events_and_accounting(gw: GatewayProcess) -> None:
    with oai(gw).responses.with_streaming_response.create(
            model="m1", input="one two", max_output_tokens=4, stream=True,
            extra_headers={"X-Request-Id": "resp-st-1"}) as raw:
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == 4 and kinds[-1] == "response.completed"
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert done.response.usage.output_tokens == 4
    rec = gw.record("resp-st-1")
    assert rec["stream"] and rec["outcome"] == "ok" and (rec["prompt_tokens"], rec["completion_tokens"]) == (8, 4)
    assert rec["ttft_ms"] is not None


def test_responses_bound_is_the_models_own_default(ups: tuple[FakeUpstream, FakeUpstream],
                                                    gateway_factory: Callable[..., GatewayProcess]) -> None:
    """The Responses API gets its output bound where every endpoint does (admit), from the model's own
    default_max_tokens, not the global one."""
    cfg = config(ups[0].url, limits={"default_max_tokens": 6})
    cfg["models"]["m1"]["default_max_tokens"] = 9
    g = gateway_factory(cfg)
    oai(g).responses.create(model="m1", input="hi")
    assert ups[0].counters()["last_request"]["max_output_tokens"] == 9


def test_responses_upper_bound_set_and_request_id_owned_by_gateway(gw: GatewayProcess,
                                                                     ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    r = oai(gw).responses.create(model="m1", input="hi")
    sent = ups[0].counters()["last_request"]
    assert sent["max_output_tokens"] == 6  # limits.default_max_tokens: the reservation is an upper bound
    assert r.usage is not None and r.usage.output_tokens == 6
    with pytest.raises(openai.BadRequestError) as e:
        oai(gw).responses.create(model="m1", input="hi", extra_body={"request_id": "resp_someone_elses"})
    assert e.value.body["param"] == "request_id"  # type: ignore[index]


@pytest.mark.parametrize("field,value", [("max_output_tokens", "5"), ("max_output_tokens", 5.0),
                                         ("max_output_tokens", 0), ("stream", "true"), ("background", True),
                                         ("input", None)])
def test_responses_strict_types(gw: GatewayProcess, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "m1", "input": "hi", field: value}
    r = httpx.post(f"{gw.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].split(".")[0] == field


def test_responses_gateway_errors_in_openai_shape(gw: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(gw, key="wrong").responses.create(model="m1", input="hi")
    with pytest.raises(openai.NotFoundError) as e:
        oai(gw).responses.create(model="nope", input="hi")
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_responses_upstream_dies_mid_stream(gw: GatewayProcess, ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    ups[0].control(die_after_chunks=3)
    events = list(oai(gw).responses.create(model="m1", input="one two", max_output_tokens=8, stream=True,
                                           extra_headers={"X-Request-Id": "resp-die-1"}))
    kinds = [e.type for e in events]
    assert kinds.count("response.output_text.delta") == 3
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-2].code == "upstream_stream_broken"  # type: ignore[union-attr]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "upstream_stream_broken"
    rec = gw.record("resp-die-1")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["status"] == 502
    assert rec["completion_tokens"] == 3  # the deltas vLLM sent before it died
    assert rec["prompt_tokens"] == 8  # no usage came: counted by the engine's /tokenize


def test_responses_engine_error_event_passes_through(gw: GatewayProcess,
                                                     ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    ups[0].control(error_event_after_chunks=2)
    events = list(oai(gw).responses.create(model="m1", input="x", max_output_tokens=8, stream=True,
                                           extra_headers={"X-Request-Id": "resp-err-1"}))
    assert events[-1].type == "error" and events[-1].message == "injected engine error"  # type: ignore[union-attr]
    rec = gw.record("resp-err-1")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["error_code"] == "internal_error"


# ---------------------------------------------------------------------- Anthropic Messages
def test_messages_non_stream_with_the_anthropic_sdk(gw: GatewayProcess) -> None:
    raw = claude(gw).messages.with_raw_response.create(
        model="m1", max_tokens=5, messages=[{"role": "user", "content": "one two three"}],
        extra_headers={"X-Request-Id": "msg-ns-1"})
    m = raw.parse()
    assert m.content[0].type == "text" and m.content[0].text == TEXT
    assert (m.usage.input_tokens, m.usage.output_tokens) == (9, 5)
    assert (raw.headers["x-gateway-prompt-tokens"], raw.headers["x-gateway-completion-tokens"]) == ("9", "5")
    rec = gw.record("msg-ns-1")
    assert rec["endpoint"] == "messages" and rec["tenant"] == "team-a"  # the key came as x-api-key
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (9, 5)


def test_messages_stream_with_the_anthropic_sdk(gw: GatewayProcess) -> None:
    with claude(gw).messages.stream(model="m1", max_tokens=4, messages=[{"role": "user", "content": "a b"}],
                                    extra_headers={"X-Request-Id": "msg-st-1"}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 "
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 8
    rec = gw.record("msg-st-1")
    assert rec["stream"] and rec["outcome"] == "ok" and (rec["prompt_tokens"], rec["completion_tokens"]) == (8, 4)


def test_messages_errors_in_anthropic_shape(gw: GatewayProcess, tmp_path: Path) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e401:
        claude(gw, key="wrong").messages.create(model="m1", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e401.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Incorrect API key provided."}}
    with pytest.raises(anthropic.NotFoundError) as e404:
        claude(gw).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e404.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": API_KEY},
                   json={"model": "m1", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": API_KEY}, content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    limited = start_gateway(tmp_path, config(gw_upstream_url(gw), tenants={"team-a": {"limits": {"rpm": 1}}}))
    try:
        claude(limited).messages.create(model="m1", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(anthropic.RateLimitError) as e429:
            claude(limited).messages.create(model="m1", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert e429.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert e429.value.response.headers.get("retry-after")
    finally:
        stop(limited.proc)


def gw_upstream_url(g: GatewayProcess) -> str:
    import yaml

    return str(yaml.safe_load(g.config_path.read_text())["models"]["m1"]["deployments"][0]["url"])


def test_messages_upstream_dies_mid_stream(gw: GatewayProcess, ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    ups[0].control(die_after_chunks=2)
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for ev in claude(gw).messages.create(model="m1", max_tokens=8, stream=True,
                                             messages=[{"role": "user", "content": "x"}],
                                             extra_headers={"X-Request-Id": "msg-die-1"}):
            seen.append(ev.type)
    assert seen.count("content_block_delta") == 2
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "failed mid-stream" in e.value.body["error"]["message"]  # type: ignore[index]
    rec = gw.record("msg-die-1")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["completion_tokens"] == 2
    assert rec["prompt_tokens"] == 7  # from message_start


def test_messages_engine_error_event(gw: GatewayProcess, ups: tuple[FakeUpstream, FakeUpstream]) -> None:
    ups[0].control(error_event_after_chunks=1)
    with pytest.raises(anthropic.APIStatusError) as e:
        list(claude(gw).messages.create(model="m1", max_tokens=8, stream=True,
                                        messages=[{"role": "user", "content": "x"}],
                                        extra_headers={"X-Request-Id": "msg-err-1"}))
    assert e.value.body["error"]["message"] == "injected engine error"  # type: ignore[index]
    assert gw.record("msg-err-1")["outcome"] == "upstream_failed_midstream"


# ---------------------------------------------------------------------- both: fallback, cache
def test_first_token_timeout_falls_back_for_both_apis(ups: tuple[FakeUpstream, FakeUpstream],
                                                      tmp_path: Path) -> None:
    slow, fast = ups
    g = start_gateway(tmp_path, config(slow.url, fast.url, first_token=0.5))
    try:
        slow.control(ttft_ms=3000)  # response.created / message_start come at once; the first token does not
        fast_before = fast.counters()["requests"]
        with oai(g).responses.with_streaming_response.create(model="m1", input="x", max_output_tokens=3,
                                                             stream=True) as raw:
            kinds = [e.type for e in raw.parse()]
            dep, reason = raw.headers.get("x-gateway-deployment"), raw.headers.get("x-gateway-fallback-reason")
        with claude(g).messages.with_streaming_response.create(
                model="m1", max_tokens=3, stream=True, messages=[{"role": "user", "content": "x"}]) as mraw:
            mkinds = [e.type for e in mraw.parse()]
            mdep, mreason = mraw.headers.get("x-gateway-deployment"), mraw.headers.get("x-gateway-fallback-reason")
        assert kinds[0] == "response.created" and kinds.count("response.created") == 1  # nothing leaked from slow
        assert kinds[-1] == "response.completed"
        assert mkinds[0] == "message_start" and mkinds.count("message_start") == 1 and mkinds[-1] == "message_stop"
        assert (dep, reason) == (mdep, mreason) == ("m1-1", "first_token_timeout")
        assert fast.counters()["requests"] - fast_before == 2
    finally:
        stop(g.proc)


def test_deterministic_requests_are_cached_but_stored_responses_are_not(gw: GatewayProcess) -> None:
    msg: dict[str, Any] = {"model": "m1", "max_tokens": 3, "extra_body": {"temperature": 0},  # not an SDK argument
                           "messages": [{"role": "user", "content": "cache me"}]}
    first = claude(gw).messages.with_raw_response.create(**msg)
    second = claude(gw).messages.with_raw_response.create(**msg)
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "hit"
    assert second.parse().content[0].text == first.parse().content[0].text  # type: ignore[union-attr]
    with claude(gw).messages.with_streaming_response.create(**msg, stream=True) as s1:
        kinds1 = [e.type for e in s1.parse()]
    with claude(gw).messages.with_streaming_response.create(**msg, stream=True) as s2:
        kinds2 = [e.type for e in s2.parse()]
        assert s2.headers["x-gateway-cache"] == "hit"
    assert kinds1 == kinds2 and kinds2[-1] == "message_stop"
    stored = [oai(gw).responses.with_raw_response.create(model="m1", input="c", temperature=0, max_output_tokens=2)
              for _ in range(2)]
    assert [r.headers["x-gateway-cache"] for r in stored] == ["bypass", "bypass"]
    assert stored[0].parse().id != stored[1].parse().id
    plain = [oai(gw).responses.with_raw_response.create(model="m1", input="c", temperature=0, max_output_tokens=2,
                                                        store=False) for _ in range(2)]
    assert [r.headers["x-gateway-cache"] for r in plain] == ["miss", "hit"]


# ---------------------------------------------------------------------- tokenizer pass-through
def test_tokenize_and_detokenize_pass_through_unbilled(gw: GatewayProcess) -> None:
    before = gw.metrics()
    h = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "tok-1"}
    r = httpx.post(f"{gw.url}/tokenize", json={"model": "m1", "prompt": "a b c"}, headers=h)
    assert r.status_code == 200 and r.json()["count"] == 4
    assert r.headers["x-gateway-deployment"] == "m1-0" and r.headers.get("x-gateway-cost-usd") is None
    d = httpx.post(f"{gw.url}/detokenize", json={"model": "m1", "tokens": [1, 2]}, headers=h)
    assert d.status_code == 200 and d.json()["prompt"] == "tok1 tok2"
    bad = httpx.post(f"{gw.url}/detokenize", json={"model": "m1", "tokens": ["1"]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens.0"
    rec = gw.record("tok-1")
    assert rec["endpoint"] == "tokenize" and rec["cost_usd"] == 0 and rec["prompt_tokens"] == 0
    after = gw.metrics()
    assert metric_value(after, "gateway_requests_total", model="m1", status="200") - \
        metric_value(before, "gateway_requests_total", model="m1", status="200") == 2
    assert tokens_delta(before, after, "gateway_prompt_tokens_total") == 0


@pytest.mark.parametrize("path,body,delta", [
    ("/v1/responses", {"input": "x", "max_output_tokens": 60}, b"event: response.output_text.delta"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60},
     b"event: content_block_delta")])
def test_client_leaving_mid_stream_is_recorded(gw: GatewayProcess, ups: tuple[FakeUpstream, FakeUpstream],
                                               path: str, body: dict[str, Any], delta: bytes) -> None:
    ups[0].control(itl_ms=30)
    rid = f"leave-{path.rsplit('/', 1)[1]}"
    seen = 0
    with httpx.stream("POST", f"{gw.url}{path}", json={"model": "m1", "stream": True, **body},
                      headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": rid}, timeout=30) as r:
        for line in r.iter_lines():
            seen += line.encode().startswith(delta)
            if seen == 3:
                break
    rec = gw.record(rid)
    assert rec["outcome"] == "client_left_midstream" and rec["status"] == 499
    assert 3 <= rec["completion_tokens"] < 60  # the output deltas relayed before the client left
    assert rec["prompt_tokens"] == 7  # Messages: from message_start; Responses: counted by the engine
    assert rec["ttft_ms"] is not None
