"""Stored responses reach the engine that holds them: previous_response_id, retrieve, across deployments and
gateway replicas (Redis), and a named error when that engine is gone, never an answer from another one.

The test upstream keeps its own store like vLLM (an id it did not make is a 404), so a request sent to
the wrong engine fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import (
    API_KEY,
    OTHER_KEY,
    ROOT,
    FakeUpstream,
    GatewayProcess,
    start_fake_upstream,
    start_gateway,
    stop,
    wait_http,
)
from tests.redis_fixtures import RedisServer, with_redis
from tests.test_apis_fake import config


@pytest.fixture
def engines() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    a, b = start_fake_upstream(["m1"]), start_fake_upstream(["m1"])
    yield a, b
    a.kill()
    b.kill()


def oai(g: GatewayProcess, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=30)


def made_on_second(g: GatewayProcess, a: FakeUpstream) -> str:
    """A response the first deployment could not make (it answered 503), so the second one holds it."""
    a.control(fail_status=503)
    try:
        raw = oai(g).responses.with_raw_response.create(model="m1", input="remember me", max_output_tokens=3)
    finally:
        a.control(fail_status=0)
    assert raw.headers["x-gateway-deployment"] == "m1-1"
    return raw.parse().id


def test_previous_response_id_and_retrieve_go_to_the_engine_that_holds_it(
        engines: tuple[FakeUpstream, FakeUpstream], tmp_path: Path) -> None:
    a, b = engines
    g = start_gateway(tmp_path, config(a.url, b.url))
    try:
        rid = made_on_second(g, a)
        a_before = a.counters()["requests"]
        for i in range(3):  # the first deployment is preferred for new requests, yet every follow-up goes to b
            raw = oai(g).responses.with_raw_response.create(model="m1", input=f"and then {i}", max_output_tokens=2,
                                                            previous_response_id=rid)
            assert raw.headers["x-gateway-deployment"] == "m1-1"
            assert b.counters()["last_request"]["previous_response_id"] == rid
            rid = raw.parse().id
        with oai(g).responses.with_streaming_response.create(model="m1", input="streamed", max_output_tokens=2,
                                                             previous_response_id=rid, stream=True) as s:
            assert s.headers["x-gateway-deployment"] == "m1-1"
            assert [e.type for e in s.parse()][-1] == "response.completed"
        assert a.counters()["requests"] == a_before
        got = oai(g).responses.retrieve(rid)
        assert got.id == rid and got.output_text == "tok0 tok1 "

        with pytest.raises(openai.NotFoundError) as other:  # another tenant: as unknown as a made-up id
            oai(g, OTHER_KEY).responses.retrieve(rid)
        assert other.value.body["code"] == "response_not_found"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            oai(g, OTHER_KEY).responses.create(model="m1", input="x", previous_response_id=rid)
        with pytest.raises(openai.NotFoundError) as unknown:
            oai(g).responses.create(model="m1", input="x", previous_response_id="resp_made_up")
        assert unknown.value.body["code"] == "response_not_found"  # type: ignore[index]

        b.control(fail_status=503)  # its engine is down: no other engine may answer in its place
        with pytest.raises(openai.InternalServerError) as down:
            oai(g).responses.create(model="m1", input="x", previous_response_id=rid)
        assert down.value.status_code == 503 and down.value.body["code"] == "stored_response_unavailable"  # type: ignore[index]
        assert "m1-1" in down.value.message
        assert a.counters()["requests"] == a_before
        b.kill()
        r = httpx.get(f"{g.url}/v1/responses/{rid}", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "stored_response_unavailable"
        rec = g.records()[-1]
        assert rec["endpoint"] == "responses.retrieve" and rec["status"] == 503 and rec["deployment"] == "m1-1"
    finally:
        stop(g.proc)


def test_replicas_share_where_responses_live_through_redis(
        engines: tuple[FakeUpstream, FakeUpstream], tmp_path: Path, redis_server: RedisServer,
        redis_prefix: str) -> None:
    a, b = engines
    shared = with_redis(config(a.url, b.url), redis_server.url, redis_prefix)
    g1, g2 = start_gateway(tmp_path, shared), start_gateway(tmp_path, shared)
    alone = start_gateway(tmp_path, config(a.url, b.url))  # no Redis: it cannot know what g1 made
    only_a = start_gateway(tmp_path, with_redis(config(a.url), redis_server.url, redis_prefix))
    try:
        rid = made_on_second(g1, a)
        raw = oai(g2).responses.with_raw_response.create(model="m1", input="next", max_output_tokens=2,
                                                         previous_response_id=rid)
        assert raw.headers["x-gateway-deployment"] == "m1-1"
        assert oai(g2).responses.retrieve(rid).id == rid
        ttl = redis_server.client().pttl(f"{redis_prefix}c:{{resp:{rid}}}")  # the cache key layout: c:{KEY}
        assert 0 < ttl <= 7 * 86400 * 1000
        with pytest.raises(openai.NotFoundError):
            oai(alone).responses.create(model="m1", input="x", previous_response_id=rid)
        with pytest.raises(openai.ConflictError) as gone:  # its deployment is not in this replica's config
            oai(only_a).responses.create(model="m1", input="x", previous_response_id=rid)
        assert gone.value.body["code"] == "stored_response_deployment_gone"  # type: ignore[index]
    finally:
        for g in (g1, g2, alone, only_a):
            stop(g.proc)


def test_engine_that_lost_its_store_is_a_named_404(engines: tuple[FakeUpstream, FakeUpstream],
                                                    tmp_path: Path) -> None:
    a, _ = engines
    g = start_gateway(tmp_path, config(a.url))
    try:
        rid = oai(g).responses.create(model="m1", input="x", max_output_tokens=2).id
        a.kill()  # a restarted engine has an empty store
        a2 = subprocess.Popen([sys.executable, "-m", "gateway.testing.fake_vllm", "--model", "m1",
                               "--port", a.url.rsplit(":", 1)[1]], cwd=ROOT)
        wait_http(f"{a.url}/health", proc=a2)
        try:
            with pytest.raises(openai.NotFoundError) as e:
                oai(g).responses.retrieve(rid)
            assert "m1-0" in e.value.message and e.value.body["code"] == "response_not_found"  # type: ignore[index]
        finally:
            stop(a2)
    finally:
        stop(g.proc)
