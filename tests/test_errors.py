"""Bad input and upstream failures: OpenAI-shaped errors with fitting status codes, never a fake success."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, KEYS, FakeUpstream, GatewayProcess, free_port, simple_config


def post(gw: GatewayProcess, body: bytes | dict[str, object], key: str | None = API_KEY,
         path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + path, content=content, headers=h, timeout=30)


def assert_openai_error(r: httpx.Response, status: int, *words: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    assert "Traceback" not in r.text
    return err


CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("body, words, param", [
    (b"{not json", ["not valid JSON"], None),
    (b"", ["empty"], None),
    (b"[1, 2]", ["JSON object"], None),
    (b"\xff\xfe garbage", ["not valid JSON"], None),
    ({"messages": [{"role": "user", "content": "x"}]}, ["model", "field required"], "model"),
    ({"model": "m1"}, ["messages", "field required"], "messages"),
    ({"model": "m1", "messages": "hello"}, ["messages"], "messages"),
    ({"model": "m1", "messages": [{"role": "wizard", "content": "x"}]}, ["messages.0.role"], "messages.0.role"),
    ({**CHAT, "max_tokens": "many"}, ["max_tokens"], "max_tokens"),
    ({**CHAT, "max_tokens": -3}, ["max_tokens"], "max_tokens"),
    ({**CHAT, "temperature": -1}, ["temperature"], "temperature"),
    ({**CHAT, "stream": "yes please"}, ["stream"], "stream"),
])
def test_bad_requests_get_a_400_naming_the_problem(gateway: GatewayProcess, body: bytes | dict[str, object],
                                                   words: list[str], param: str | None) -> None:
    err = assert_openai_error(post(gateway, body), 400, *words)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_nan_temperature_is_refused(gateway: GatewayProcess) -> None:
    r = post(gateway, b'{"model":"m1","messages":[{"role":"user","content":"x"}],"temperature":NaN}')
    assert_openai_error(r, 400)


def test_unknown_model_is_404(gateway: GatewayProcess) -> None:
    err = assert_openai_error(post(gateway, {**CHAT, "model": "gpt-7"}), 404, "gpt-7")
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_auth_missing_and_wrong_keys(gateway: GatewayProcess) -> None:
    assert_openai_error(post(gateway, CHAT, key=None), 401, "Missing API key")
    err = assert_openai_error(post(gateway, CHAT, key="sk-wrong"), 401, "Incorrect API key")
    assert err["type"] == "authentication_error"
    post(gateway, CHAT, key="sk-wrong", **{"X-Request-Id": "bad-key-req"})
    assert "sk-wrong" not in orjson.dumps(gateway.record("bad-key-req")).decode()
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_body_over_the_limit_is_413(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    gw = gateway_factory({**simple_config(upstream.url), "server": {"max_body_bytes": 2048}})
    big = {**CHAT, "messages": [{"role": "user", "content": "x " * 5000}]}
    assert_openai_error(post(gw, big, key=None), 413, "2048 bytes")
    # chunked upload without Content-Length is cut off too
    r = httpx.post(gw.url + "/v1/chat/completions", content=iter([orjson.dumps(big)]), timeout=10)
    assert_openai_error(r, 413)


def test_unknown_route_is_openai_shaped(gateway: GatewayProcess) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/nothing-here"), 404)


def test_upstream_5xx_becomes_502_not_success(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(fail_status=500)
    r = post(gateway, CHAT, **{"X-Request-Id": "up-500"})
    err = assert_openai_error(r, 502, "injected failure")
    assert err["type"] == "api_error"
    rec = gateway.record("up-500")
    assert rec["status"] == 502 and rec["attempts"][0]["outcome"] == "upstream_500"
    with pytest.raises(openai.InternalServerError):
        OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(**CHAT)


def test_upstream_4xx_keeps_its_status_and_message(gateway: GatewayProcess) -> None:
    long_prompt = " ".join(["w"] * 3000)  # over the fake's max_model_len of 2048
    err = assert_openai_error(post(gateway, {**CHAT, "messages": [{"role": "user", "content": long_prompt}]}),
                              400, "maximum context length")
    assert err["code"] == "upstream_rejected"


def test_unreachable_deployment_is_502(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(f"http://127.0.0.1:{free_port()}", keys=KEYS))
    err = assert_openai_error(post(gw, CHAT), 502, "cannot connect")
    assert err["code"] == "upstream_unavailable"
    assert httpx.get(gw.url + "/readyz").status_code == 503


def test_first_token_timeout_is_504(gateway_factory: Callable[..., GatewayProcess],
                                    reset_upstream: FakeUpstream) -> None:
    gw = gateway_factory(simple_config(reset_upstream.url, timeouts={"connect": 1, "first_token": 0.3,
                                                                      "total": 0.5}))
    reset_upstream.control(ttft_ms=2000)
    t0 = time.monotonic()
    assert_openai_error(post(gw, {**CHAT, "stream": True}, key=None), 504, "no first chunk within 0.3s")
    assert_openai_error(post(gw, CHAT, key=None), 504, "did not answer within 0.5s")
    assert time.monotonic() - t0 < 2.5


def test_stream_dying_midway_ends_with_an_error_event_not_a_fake_stop(
        gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(die_after_chunks=3)
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for chunk in client.chat.completions.create(**CHAT | {"max_tokens": 10}, stream=True,
                                                    extra_headers={"X-Request-Id": "dies-midway"}):
            assert chunk.choices[0].finish_reason is None
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "tok0 tok1 tok2 "
    rec = gateway.record("dies-midway")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["status"] == 502
    assert rec["completion_tokens"] == 3  # what was delivered is accounted


def test_malformed_chunk_mid_stream_is_an_error_event(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(malformed_after_chunks=2)
    r = post(gateway, {**CHAT, "max_tokens": 5, "stream": True})
    events = [ln for ln in r.text.split("\n\n") if ln.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert orjson.loads(events[-2][5:])["error"]["code"] == "upstream_stream_broken"
    assert '"finish_reason":"stop"' not in r.text


def test_missing_usage_is_recorded_as_unreported(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(omit_usage=True)
    r = post(gateway, CHAT, **{"X-Request-Id": "no-usage"})
    assert r.status_code == 200 and "x-gateway-prompt-tokens" not in r.headers
    assert gateway.record("no-usage")["usage_reported"] is False


def test_bad_requests_do_not_disturb_neighbours(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(itl_ms=5)
    bad = [b"{", b"[]", orjson.dumps({"model": "nope", "messages": []}), b"\xff" * 100]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        good = [pool.submit(post, gateway, {**CHAT, "max_tokens": 8}) for _ in range(20)]
        bads = [pool.submit(post, gateway, b) for b in bad * 10]
        assert all(f.result().status_code == 200 for f in good)
        assert all(400 <= f.result().status_code < 500 for f in bads)
