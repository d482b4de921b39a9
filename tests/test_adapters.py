"""Catalogue LoRA adapters loaded on demand (gateway/routing/adapters.py), against the fake vLLM's runtime-LoRA
endpoints (the same API shapes as vLLM 0.32's /v1/load_lora_adapter and /v1/unload_lora_adapter).

The real engine's behaviour is checked in tests/test_adapters_vllm.py; here the faults: slow, failing and
refused loads, a missing adapter file, an engine restart, eviction order, single flight, billing.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from tests.conftest import FakeUpstream, GatewayProcess, metric_value

Factory = Callable[..., GatewayProcess]


def adapter_dirs(tmp: Path, n: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        d = tmp / f"lora-{i}"
        d.mkdir(exist_ok=True)
        out[f"ad{i}"] = str(d)
    return out


def config(urls: list[str], adapters: dict[str, str], slots: int = 2, **placement: Any) -> dict[str, Any]:
    return {
        "models": {"base": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                            "deployments": [{"name": f"eng-{i}", "url": u, "model": "m1", "adapter_slots": slots}
                                            for i, u in enumerate(urls)]}},
        "adapters": {n: {"base": "base", "path": p} for n, p in adapters.items()},
        "adapter_placement": {"sync_interval_s": 3600, **placement},
    }


def chat(gw: GatewayProcess, model: str, timeout: float = 30, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, **kw}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=timeout)


def test_adapter_absent_at_start_is_loaded_on_demand_and_accounted(tmp_path: Path, fake: FakeUpstream,
                                                                     gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 1)))
    fake.control(load_ms=150)
    r = chat(gw, "ad0")
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-adapter-load"] == "cold"
    assert float(r.headers["x-gateway-adapter-load-ms"]) >= 140
    assert r.headers["x-gateway-upstream-model"] == "ad0" and r.headers["x-gateway-model"] == "ad0"
    assert fake.state()["loras"] == {"ad0": str(tmp_path / "lora-0")}
    rec = gw.record(r.headers["x-request-id"])
    assert rec["adapter_load"] == "cold" and rec["adapter_load_ms"] >= 140
    assert rec["overhead_ms"] < rec["adapter_load_ms"]  # the load is not counted as the gateway's overhead
    assert fake.state()["counters"]["last_request"]["model"] == "ad0"
    again = chat(gw, "ad0")
    assert "x-gateway-adapter-load" not in again.headers and fake.counters()["lora_loads"] == 1
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_loads_total", adapter="ad0", engine="eng-0", reason="cold") == 1
    assert metric_value(m, "gateway_adapter_load_seconds_count", engine="eng-0") == 1
    assert metric_value(m, "gateway_adapters_held", engine="eng-0") == 1


def test_least_recently_used_is_evicted_and_engine_agrees(tmp_path: Path, fake: FakeUpstream,
                                                          gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 4), slots=2))
    for name in ("ad0", "ad1", "ad0", "ad2"):  # ad1 is the least recently used when ad2 needs a slot
        assert chat(gw, name).status_code == 200
    assert set(fake.state()["loras"]) == {"ad0", "ad2"}
    assert chat(gw, "ad3").status_code == 200  # now ad0 is the older
    assert set(fake.state()["loras"]) == {"ad2", "ad3"}
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_evictions_total", adapter="ad1", reason="lru") == 1
    assert metric_value(m, "gateway_adapter_evictions_total", adapter="ad0", reason="lru") == 1
    assert metric_value(m, "gateway_adapters_held", engine="eng-0") == 2


def test_adapter_with_a_request_in_flight_is_never_evicted(tmp_path: Path, fake: FakeUpstream,
                                                           gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 3), slots=2))
    assert chat(gw, "ad0").status_code == 200
    assert chat(gw, "ad1").status_code == 200  # ad0 is now the least recently used
    fake.control(itl_ms=200)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # a stream on ad0 of ~2 s: in flight while ad2 needs a slot
        fut = pool.submit(lambda: httpx.post(f"{gw.url}/v1/chat/completions", json={
            "model": "ad0", "stream": True, "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}, timeout=60))
        deadline = time.monotonic() + 10
        while fake.state()["lora_running"].get("ad0", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        fake.control(itl_ms=0)  # the new requests are fast; the running stream keeps its pace per token
        assert chat(gw, "ad2").status_code == 200
        assert set(fake.state()["loras"]) == {"ad0", "ad2"}  # ad1 went, not the older but busy ad0
        stream = fut.result()
    assert stream.status_code == 200 and "[DONE]" in stream.text and '"error"' not in stream.text


def test_in_flight_adapters_fill_every_slot_a_request_waits_for_one(tmp_path: Path, fake: FakeUpstream,
                                                                    gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 2), slots=1, slot_wait_s=20))
    fake.control(ttft_ms=1500)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, gw, "ad0")
        time.sleep(0.5)
        t0 = time.monotonic()
        second = chat(gw, "ad1")
        assert second.status_code == 200
        assert time.monotonic() - t0 >= 0.5  # it waited for ad0's request to end
        assert first.result().status_code == 200
    assert set(fake.state()["loras"]) == {"ad1"}


def test_ten_concurrent_first_requests_cause_one_load(tmp_path: Path, fake: FakeUpstream,
                                                      gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 1)))
    fake.control(load_ms=500)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(gw, "ad0"), range(10)))
    assert [a.status_code for a in answers] == [200] * 10
    assert fake.counters()["lora_loads"] == 1
    kinds = sorted(a.headers.get("x-gateway-adapter-load", "-") for a in answers)
    assert kinds.count("cold") == 1 and kinds.count("cold") + kinds.count("joined") + kinds.count("-") == 10
    assert metric_value(gw.metrics(), "gateway_adapter_loads_total", adapter="ad0") == 1


def test_ten_concurrent_first_requests_on_full_slots_cause_one_eviction_and_one_load(
        tmp_path: Path, fake: FakeUpstream, gateway_factory: Factory) -> None:
    # The CI failure of stop 32: with every slot held, each waiter evicted an adapter and loaded again.
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 3), slots=2))
    assert chat(gw, "ad0").status_code == 200 and chat(gw, "ad1").status_code == 200
    fake.control(load_ms=300, unload_ms=300)  # the others arrive while the eviction is under way
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(gw, "ad2"), range(10)))
    assert [a.status_code for a in answers] == [200] * 10
    assert fake.counters()["lora_loads"] == 3 and fake.counters()["lora_unloads"] == 1
    assert set(fake.state()["loras"]) == {"ad1", "ad2"}  # ad0, the least recently used, went; ad1 stayed
    assert sum(a.headers.get("x-gateway-adapter-load") == "cold" for a in answers) == 1
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_loads_total", adapter="ad2") == 1
    assert metric_value(m, "gateway_adapters_held", engine="eng-0") == 2


def test_engine_restart_reloads_instead_of_404(tmp_path: Path, fake: FakeUpstream, gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 1)))
    assert chat(gw, "ad0").status_code == 200
    fake.control(restart=True)  # the engine lost its runtime adapters; the gateway did not see it go down
    r = chat(gw, "ad0")
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-adapter-load"] == "reload"
    assert fake.state()["loras"] == {"ad0": str(tmp_path / "lora-0")} and fake.counters()["lora_loads"] == 2
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_loads_total", adapter="ad0", reason="reload") == 1
    assert metric_value(m, "gateway_adapter_evictions_total", adapter="ad0", reason="lost") == 1


def test_engine_back_from_a_restart_is_resynced(tmp_path: Path, fake: FakeUpstream, gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 1)))
    assert chat(gw, "ad0").status_code == 200
    fake.control(healthy=False)
    time.sleep(1.5)  # health_interval 0.5 s: the gateway sees it down
    fake.control(healthy=True, restart=True)
    deadline = time.monotonic() + 10
    while metric_value(gw.metrics(), "gateway_adapters_held", engine="eng-0") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_value(gw.metrics(), "gateway_adapters_held", engine="eng-0") == 0  # re-read: it holds nothing
    r = chat(gw, "ad0")
    assert r.status_code == 200 and r.headers["x-gateway-adapter-load"] == "reload"


def test_failed_and_slow_loads_fall_back_along_the_route(tmp_path: Path, fake: FakeUpstream,
                                                         gateway_factory: Factory) -> None:
    cfg = config([fake.url], adapter_dirs(tmp_path, 1), load_timeout_s=0.5)
    cfg["routes"] = {"ad0-or-base": {"candidates": ["ad0", "base"]}}
    gw = gateway_factory(cfg)
    fake.control(load_fail_status=500)
    r = chat(gw, "ad0-or-base")
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "base"
    assert r.headers["x-gateway-fallback-reason"] == "adapter_load_failed"
    fake.control(load_fail_status=0, load_ms=3000)
    t0 = time.monotonic()
    r = chat(gw, "ad0-or-base")
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "base" and time.monotonic() - t0 < 2.5
    assert r.headers["x-gateway-fallback-reason"] == "adapter_load_timeout"
    direct = chat(gw, "ad0")  # no route: nothing to fall back to (the slow load is still under way: joined)
    assert direct.status_code in (502, 200)
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_load_failures_total", adapter="ad0", reason="error") == 1
    assert metric_value(m, "gateway_adapter_load_failures_total", adapter="ad0", reason="timeout") >= 1
    assert metric_value(m, "gateway_fallbacks_total", from_model="ad0", to_model="base") == 2


def test_missing_adapter_file_is_a_clear_error(tmp_path: Path, fake: FakeUpstream, gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], {"ghost": str(tmp_path / "no-such-adapter")}))
    t0 = time.monotonic()
    r = chat(gw, "ghost")
    assert time.monotonic() - t0 < 5
    assert r.status_code == 500 and r.json()["error"]["code"] == "adapter_not_found"
    msg = r.json()["error"]["message"]
    assert "ghost" in msg and str(tmp_path / "no-such-adapter") in msg
    assert metric_value(gw.metrics(), "gateway_adapter_load_failures_total", adapter="ghost",
                        reason="not_found") == 1


def test_engine_refusing_a_load_for_full_slots_gets_an_eviction_not_a_retry_loop(
        tmp_path: Path, fake: FakeUpstream, gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url], adapter_dirs(tmp_path, 3), slots=3))
    fake.control(max_loras=1)  # the engine holds fewer than the gateway was told
    assert chat(gw, "ad0").status_code == 200
    r = chat(gw, "ad1")  # refused as full -> re-read, evict the idle ad0, load again: once
    assert r.status_code == 200, r.text
    assert set(fake.state()["loras"]) == {"ad1"}
    fake.control(itl_ms=300)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: httpx.post(f"{gw.url}/v1/chat/completions", json={
            "model": "ad1", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
            timeout=60))
        deadline = time.monotonic() + 10
        while fake.state()["lora_running"].get("ad1", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        refused = chat(gw, "ad2")  # nothing idle to evict: a 503 at once, not a retry loop
        assert refused.status_code == 503 and time.monotonic() - t0 < 5
        assert busy.result().status_code == 200
    assert fake.counters()["lora_loads"] == 2
    assert metric_value(gw.metrics(), "gateway_adapter_load_failures_total", adapter="ad2", reason="slots_full") == 1


@pytest.mark.parametrize("billing", ["request", "operator"])
def test_cold_start_billed_to_the_request_or_the_operator(tmp_path: Path, fake: FakeUpstream,
                                                          gateway_factory: Factory, billing: str) -> None:
    cfg = config([fake.url], adapter_dirs(tmp_path, 1), cold_start_billing=billing, load_usd_per_hour=36.0)
    gw = gateway_factory(cfg)
    fake.control(load_ms=300)
    cold = gw.record(chat(gw, "ad0").headers["x-request-id"])
    warm = gw.record(chat(gw, "ad0").headers["x-request-id"])
    # 36 USD/h = 0.01 USD/s: a load of >= 0.3 s costs >= 0.003 USD
    assert cold["adapter_load_cost_pico_usd"] >= 3 * 10**9 and warm["adapter_load_cost_pico_usd"] == 0
    extra = cold["cost_pico_usd"] - warm["cost_pico_usd"]  # same tokens, same prices
    assert extra == (cold["adapter_load_cost_pico_usd"] if billing == "request" else 0)
    assert metric_value(gw.metrics(), "gateway_adapter_load_cost_usd_total", billed_to=billing) >= 0.003


def test_hot_adapter_is_replicated_onto_a_second_engine(tmp_path: Path, fake: FakeUpstream, fake_b: FakeUpstream,
                                                        gateway_factory: Factory) -> None:
    gw = gateway_factory(config([fake.url, fake_b.url], adapter_dirs(tmp_path, 1), replicate_in_flight=1))
    assert chat(gw, "ad0").status_code == 200
    first = "eng-0" if fake.state()["loras"] else "eng-1"
    for f in (fake, fake_b):
        f.control(ttft_ms=1500)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, gw, "ad0")
        time.sleep(0.5)
        second = chat(gw, "ad0")  # the holder has 1 in flight: one more engine gets it
    assert slow.result().status_code == 200 and second.status_code == 200
    assert second.headers["x-gateway-adapter-load"] == "replica" and second.headers["x-gateway-deployment"] != first
    assert "ad0" in fake.state()["loras"] and "ad0" in fake_b.state()["loras"]


def test_config_checks_the_catalogue() -> None:
    base = ("models:\n  base:\n    deployments:\n      - {url: 'http://x:1', model: m, adapter_slots: %d}\n"
            "adapters:\n  %s: {base: %s, path: /a}\n")
    cfg = parse_config(base % (2, "ad", "base"), "t.yaml")
    ad = cfg.models["ad"]
    assert ad.adapter is not None and ad.adapter.path == "/a" and ad.tier == "adapter"
    assert ad.deployments == cfg.models["base"].deployments and ad.pricing == cfg.models["base"].pricing
    for text, words in ((base % (2, "ad", "nope"), "is not a model"), (base % (0, "ad", "base"), "adapter_slots"),
                        (base % (2, "base", "base"), "cannot have the name")):
        with pytest.raises(ConfigError, match=words):
            parse_config(text, "t.yaml")


def test_benchmark_script_runs_against_the_fake(tmp_path: Path) -> None:
    """loadtests/bench_adapters.py --fake: both placements run the same sequence; the result file is written."""
    from loadtests import bench_adapters

    out = tmp_path / "bench.json"
    assert bench_adapters.main(["--fake", "--requests", "40", "--adapters", "5", "--slots", "1", "--engines", "2",
                                "--concurrency", "2", "--fake-load-ms", "20", "--out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"lru", "random"}
    for r in rows.values():
        assert r["requests"] == 40 and r["errors"] == 0 and 0 < r["cold_loads"] <= 40
        assert r["ttft_p50_ms"] <= r["ttft_p95_ms"]
    assert bench_adapters.zipf_sequence(["a", "b"], 10, 1.1, 3) == bench_adapters.zipf_sequence(["a", "b"], 10, 1.1, 3)
