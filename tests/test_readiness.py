"""/readyz: `require=all` (every model served) and `require=any` (the Kubernetes probe: one engine down must
not take every gateway replica out of the Service)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import FakeUpstream, GatewayProcess, simple_config


def _wait_status(url: str, status: int, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url, timeout=5)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_readyz_any_keeps_the_replica_ready_while_one_model_is_down(
        gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream, fake_b: FakeUpstream) -> None:
    cfg = simple_config(fake.url, model="m1")
    cfg["models"]["m2"] = simple_config(fake_b.url, model="m2", upstream_model="m1")["models"]["m2"]
    gw = gateway_factory(cfg)
    for q in ("", "?require=all", "?require=any"):
        r = _wait_status(gw.url + "/readyz" + q, 200)
        assert r.status_code == 200 and r.json() == {"ready": True, "models": {"m1": True, "m2": True}}, q

    fake_b.control(healthy=False)  # m2's only engine: down for every replica alike
    r = _wait_status(gw.url + "/readyz", 503)
    assert r.status_code == 503 and r.json() == {"ready": False, "models": {"m1": True, "m2": False}}
    r = httpx.get(gw.url + "/readyz?require=any", timeout=5)
    assert r.status_code == 200 and r.json() == {"ready": True, "models": {"m1": True, "m2": False}}

    fake.control(healthy=False)  # no model left: this replica cannot serve anything
    r = _wait_status(gw.url + "/readyz?require=any", 503)
    assert r.status_code == 503 and r.json() == {"ready": False, "models": {"m1": False, "m2": False}}

    fake.control(healthy=True)
    assert _wait_status(gw.url + "/readyz?require=any", 200).status_code == 200


def test_readyz_rejects_an_unknown_requirement(gateway_factory: Callable[..., GatewayProcess],
                                               fake: FakeUpstream) -> None:
    gw = gateway_factory(simple_config(fake.url))
    r = httpx.get(gw.url + "/readyz?require=some", timeout=5)
    assert r.status_code == 400 and "require" in r.json()["error"]["message"]
