"""REAL vLLM: requests of every class are served by an engine started with --scheduling-policy priority (their
`priority` sent) and by one without it (the field left out).

vLLM's V0 engine refused a non-zero `priority` without the policy; the V1 engine (0.32, the local build) accepts
and ignores it. The gateway leaves it out either way (tests/test_fairness.py checks the body sent), so a class
never breaks an engine and never pretends to a priority the engine does not apply. The engine with the policy
is a private one (VLLM_PRIORITY_CHAT_URL names one already running, e.g. loadtests/fairness.py's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import orjson
import pytest

from deploy.local import engines
from tests.conftest import GatewayProcess, free_port, start_gateway, stop

pytestmark = pytest.mark.vllm

KEY = "sk-fair-vllm-batch"


@pytest.fixture(scope="module")
def priority_engine() -> Iterator[str]:
    url = os.environ.get("VLLM_PRIORITY_CHAT_URL")
    if url and engines.is_healthy(url):
        yield url
        return
    engines.ensure_ready()
    port = free_port()
    proc = engines.start_chat_engine(port, lora=False, extra_args=["--scheduling-policy", "priority"])
    url = f"http://127.0.0.1:{port}"
    try:
        engines.wait_healthy(url, timeout=900, proc=proc)
        yield url
    finally:
        engines.stop(proc)


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str], priority_engine: str,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    t = {"connect": 2, "first_token": 120, "total": 300}
    g = start_gateway(tmp_path_factory.mktemp("gw-fair"), {
        "auth": {"keys": [{"tenant": "bulk", "key": KEY}]},
        "tenants": {"bulk": {"priority_class": "batch"}},
        "models": {
            "prio": {"deployments": [{"name": "prio-0", "url": priority_engine, "model": "smollm2", "timeouts": t,
                                      "priority_scheduling": True, "fair_queue": {}}]},
            "plain": {"deployments": [{"name": "plain-0", "url": vllm["chat"], "model": "smollm2", "timeouts": t}]},
        }})
    yield g
    stop(g.proc)


def body(model: str, **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                         **extra})


def test_priority_engine_takes_every_class_priority(priority_engine: str) -> None:
    """The values the default classes send (and a negative one, below vLLM's default 0) are valid to vLLM."""
    for prio in (-10, 0, 10, 20):
        r = httpx.post(priority_engine + "/v1/chat/completions", content=body("smollm2", priority=prio),
                       timeout=120, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("model", ["prio", "plain"])
def test_batch_class_served_with_and_without_the_policy(gw: GatewayProcess, model: str) -> None:
    for extra in ({}, {"priority": 50}, {"priority": -50}):
        r = httpx.post(gw.url + "/v1/chat/completions", content=body(model, **extra), timeout=300,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                                "X-Request-Id": f"fair-{model}-{extra.get('priority', 'none')}"})
        assert r.status_code == 200, r.text
    rec = gw.record("fair-prio-50")
    assert rec["priority"] == 50 and rec["priority_class"] == "batch"  # lowered by the client
    assert gw.record("fair-prio--50")["priority"] == 20  # never raised above the class
    assert gw.record(f"fair-{model}-none")["deployment"] == f"{model}-0"
