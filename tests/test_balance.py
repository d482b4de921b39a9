"""Balance policies within one model: prefix affinity, its load bound and engine feedback, against test upstreams."""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import ConfigError, PrefixRoutingSpec, parse_config
from gateway.routing.balance import prefix_blocks
from gateway.routing.live import parse_vllm_metrics
from tests.conftest import FakeUpstream, GatewayProcess, metric_value, start_fake_upstream

BLOCK = 64


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[FakeUpstream]]:
    fakes = [start_fake_upstream(["chat-base"]) for _ in range(3)]
    yield fakes
    for f in fakes:
        f.kill()


@pytest.fixture(autouse=True)
def normal(replicas: list[FakeUpstream]) -> Iterator[None]:
    for f in replicas:
        f.control(ttft_ms=0, fail_status=0, kv_cache_usage=0, prefix_cache_hits=None, prefix_cache_queries=None,
                  cached_tokens=0, reset_counters=True)
    yield


def config(replicas: list[FakeUpstream], balance: str = "prefix", **prefix: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0, "cached_prompt_per_1m": 0.25},
        "balance": balance,
        "deployments": [{"name": f"r{i}", "url": f.url, "model": "chat-base"} for i, f in enumerate(replicas)]}
    if balance == "prefix":
        model["prefix_routing"] = {"block_chars": BLOCK, **prefix}
    return {"models": {"chat": model}, "metrics_scrape_interval": 0.2}


def system_prompt(app: int) -> str:
    return " ".join(f"app{app}-rule{i}" for i in range(80))  # ~900 characters: 14 blocks of 64


def ask(gw: GatewayProcess, system: str, user: str, **body: Any) -> httpx.Response:
    payload = {"model": "chat", "max_tokens": 2, **body,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    r = httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(payload), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    return r


def test_prefix_blocks_are_chained_and_whole() -> None:
    a = {"messages": [{"role": "system", "content": "x" * 300}, {"role": "user", "content": "hi"}]}
    b = {"messages": [{"role": "system", "content": "x" * 300}, {"role": "user", "content": "bye"}]}
    c = {"messages": [{"role": "system", "content": "y" + "x" * 299}, {"role": "user", "content": "hi"}]}
    ha, hb, hc = (prefix_blocks(x, BLOCK, 64) for x in (a, b, c))
    assert len(ha) == len("<|system|>\x1e" + "x" * 300 + "\x1e<|user|>\x1ehi") // BLOCK  # whole blocks only
    assert ha[:4] == hb[:4]  # the shared system prompt
    assert not set(ha) & set(hc)  # a change in the first block changes every block after it
    assert len(prefix_blocks(a, BLOCK, 2)) == 2  # bounded work per request
    assert prefix_blocks({"messages": [{"role": "user", "content": "short"}]}, BLOCK, 64) == []
    # an image part counts as content: two requests differing only in their image share no block after it
    img = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200}}]
    img2 = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "B" * 200}}]
    assert prefix_blocks({"messages": [{"role": "user", "content": img}]}, BLOCK, 64)[-1] != prefix_blocks(
        {"messages": [{"role": "user", "content": img2}]}, BLOCK, 64)[-1]


def test_balance_config_is_checked(replicas: list[FakeUpstream]) -> None:
    cfg = parse_config(orjson.dumps(config(replicas)).decode(), "t")
    assert cfg.models["chat"].balance == "prefix" and cfg.models["chat"].prefix_routing == PrefixRoutingSpec(
        block_chars=BLOCK)
    default = parse_config(orjson.dumps(config(replicas, "least_outstanding")).decode(), "t")
    assert default.models["chat"].prefix_routing is None
    bad = config(replicas, "least_outstanding")
    bad["models"]["chat"]["prefix_routing"] = {"load_factor": 2}
    with pytest.raises(ConfigError, match="prefix_routing applies only with balance: prefix"):
        parse_config(orjson.dumps(bad).decode(), "t")
    bad["models"]["chat"]["balance"] = "random"
    with pytest.raises(ConfigError, match="models.chat.balance"):
        parse_config(orjson.dumps(bad).decode(), "t")


def test_a_shared_system_prompt_stays_on_one_replica(gateway_factory: Callable[..., GatewayProcess],
                                                     replicas: list[FakeUpstream]) -> None:
    """Three applications take turns: each one's requests all land on one replica, each on its own."""
    gw = gateway_factory(config(replicas))
    answers = {app: [] for app in range(3)}  # type: dict[int, list[httpx.Response]]
    for i in range(8):
        for app in range(3):
            answers[app].append(ask(gw, system_prompt(app), f"question {i}?"))
    homes = {app: {r.headers["x-gateway-deployment"] for r in rs} for app, rs in answers.items()}
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set.union(*homes.values())) == 3  # one replica per application
    assert [r.headers["x-gateway-balance"] for r in answers[0]] == ["new"] + ["affinity"] * 7
    assert sorted(f.counters()["requests"] for f in replicas) == [8, 8, 8]
    # a multi-turn conversation that starts with the same system prompt joins it there
    turn = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "chat", "max_tokens": 2, "messages": [
            {"role": "system", "content": system_prompt(1)}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a " * 100}, {"role": "user", "content": "and then?"}]})
    assert turn.headers["x-gateway-deployment"] in homes[1] and turn.headers["x-gateway-balance"] == "affinity"
    m = gw.metrics()
    assert metric_value(m, "gateway_balance_decisions_total", model="chat", decision="affinity") == 22
    rec = gw.records()[-1]
    assert rec["balance"] == "affinity" and rec["prefix_blocks_matched"] >= 14


def test_one_busy_prefix_alone_is_spread_by_the_rate_bound(gateway_factory: Callable[..., GatewayProcess],
                                                           replicas: list[FakeUpstream]) -> None:
    """One application sends everything, one request at a time: no replica gets more than 4 requests (plus
    rate_factor) ahead of the others, and the replicas that learnt the prefix share it by affinity."""
    gw = gateway_factory(config(replicas, rate_factor=1.2))
    answers = [ask(gw, system_prompt(9), f"busy {i}") for i in range(30)]
    served = sorted(f.counters()["requests"] for f in replicas)
    assert served[-1] - served[0] <= 5 and sum(served) == 30, served
    decisions = Counter(r.headers["x-gateway-balance"] for r in answers)
    assert decisions["new"] == 1 and decisions["spill"] >= 2 and decisions["affinity"] >= 20, decisions


def test_different_prefixes_spread_evenly(gateway_factory: Callable[..., GatewayProcess],
                                          replicas: list[FakeUpstream]) -> None:
    gw = gateway_factory(config(replicas))
    for app in range(12):
        for q in range(2):
            ask(gw, system_prompt(app), f"q{q}")
    served = [f.counters()["requests"] for f in replicas]
    assert served == [8, 8, 8]  # four applications each, both requests of an application together
    records = gw.records()
    assert [r["balance"] for r in records] == ["new", "affinity"] * 12
    assert all(a["deployment"] == b["deployment"] for a, b in zip(records[::2], records[1::2], strict=True))


def test_a_hot_prefix_spills_at_the_load_bound(gateway_factory: Callable[..., GatewayProcess],
                                               replicas: list[FakeUpstream]) -> None:
    """Nine concurrent requests of one prefix: no replica holds more than its bounded share in flight."""
    gw = gateway_factory(config(replicas, load_factor=1.25))
    for f in replicas:
        f.control(ttft_ms=1500)
    n = 9
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: ask(gw, system_prompt(7), f"hot {i}"), range(n)))
    per_replica = Counter(r.headers["x-gateway-deployment"] for r in answers)
    bound = math.ceil(1.25 * n / 3)
    assert max(per_replica.values()) <= bound, per_replica
    assert len(per_replica) >= 2
    decisions = Counter(r.headers["x-gateway-balance"] for r in answers)
    assert decisions["spill"] >= 1 and decisions["affinity"] >= 1, decisions
    # once spilled, the prefix is served by both replicas that hold it: a quiet follow-up goes to one of them
    for f in replicas:
        f.control(ttft_ms=0)
    follow = ask(gw, system_prompt(7), "after the rush")
    assert follow.headers["x-gateway-balance"] == "affinity"


def test_least_outstanding_scatters_a_shared_prefix(gateway_factory: Callable[..., GatewayProcess],
                                                    replicas: list[FakeUpstream]) -> None:
    """The baseline: with concurrent requests, one system prompt reaches every replica (each prefills it)."""
    gw = gateway_factory(config(replicas, "least_outstanding"))
    for f in replicas:
        f.control(ttft_ms=300)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: ask(gw, system_prompt(3), f"q {i}"), range(6)))
    assert len({r.headers["x-gateway-deployment"] for r in answers}) == 3
    assert {r.headers["x-gateway-balance"] for r in answers} == {"least_outstanding"}


def wait_scraped() -> None:
    time.sleep(0.7)  # more than three scrape intervals


def test_a_full_kv_cache_takes_no_affinity_traffic(gateway_factory: Callable[..., GatewayProcess],
                                                   replicas: list[FakeUpstream]) -> None:
    gw = gateway_factory(config(replicas))
    home = ask(gw, system_prompt(5), "first").headers["x-gateway-deployment"]
    fake = replicas[int(home[1:])]
    fake.control(kv_cache_usage=0.97)  # vLLM's kv_cache_usage_perc above max_kv_cache (0.9)
    wait_scraped()
    r = ask(gw, system_prompt(5), "second")
    assert r.headers["x-gateway-deployment"] != home and r.headers["x-gateway-balance"] == "spill"
    fake.control(kv_cache_usage=0.1)
    wait_scraped()
    assert ask(gw, system_prompt(5), "third").headers["x-gateway-balance"] == "affinity"


def test_an_engine_restart_forgets_its_prefixes(gateway_factory: Callable[..., GatewayProcess],
                                                replicas: list[FakeUpstream]) -> None:
    gw = gateway_factory(config(replicas))
    home = ask(gw, system_prompt(4), "first").headers["x-gateway-deployment"]
    assert ask(gw, system_prompt(4), "again").headers["x-gateway-balance"] == "affinity"
    fake = replicas[int(home[1:])]
    fake.control(prefix_cache_hits=5000, prefix_cache_queries=9000)
    wait_scraped()
    m = gw.metrics()  # the index's size, as the engine feedback left it
    held = metric_value(m, "gateway_prefix_index_blocks", deployment=home, kind="held")
    sent = [prefix_blocks({"messages": [{"role": "system", "content": system_prompt(4)},
                                        {"role": "user", "content": q}]}, BLOCK, 64) for q in ("first", "again")]
    assert held == len(set(sent[0]) | set(sent[1])) > 0  # the two requests' blocks, the shared ones once
    assert metric_value(m, "gateway_prefix_index_blocks", deployment=home, kind="capacity") >= held
    fake.control(prefix_cache_hits=0, prefix_cache_queries=10)  # counters went down: the engine restarted
    wait_scraped()
    assert metric_value(gw.metrics(), "gateway_prefix_index_blocks", deployment=home, kind="held") == 0
    assert ask(gw, system_prompt(4), "after the restart").headers["x-gateway-balance"] == "new"


def test_vllm_prefix_counters_are_parsed() -> None:
    text = ("# TYPE vllm:prefix_cache_hits_total counter\n"
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0\n'
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1118.0\n'
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="2912",enable_prefix_caching="True"} 1.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    got = parse_vllm_metrics(text)
    assert got == {"prefix_hits": 512.0, "prefix_queries": 1118.0, "kv_capacity_tokens": 2912 * 16,
                   "kv_cache": 0.25}


def test_cached_prompt_tokens_are_billed_cheaper_and_the_saving_is_recorded(
        gateway_factory: Callable[..., GatewayProcess], replicas: list[FakeUpstream]) -> None:
    """Prices per 1M: prompt 1.0, cached prompt 0.25, completion 2.0; the upstream reports 40 cached tokens."""
    gw = gateway_factory(config(replicas))
    for f in replicas:
        f.control(cached_tokens=40)
    r = ask(gw, system_prompt(2), "how much?")
    h = r.headers
    prompt, completion, cached = (int(h[f"x-gateway-{k}-tokens"]) for k in ("prompt", "completion", "cached"))
    assert cached == 40 and prompt > cached
    assert float(h["x-gateway-cost-usd"]) == pytest.approx(((prompt - 40) * 1.0 + 40 * 0.25 + completion * 2.0) / 1e6)
    assert float(h["x-gateway-prefix-saved-usd"]) == pytest.approx(40 * 0.75 / 1e6)
    # a stream is accounted the same way (its usage arrives in the last chunk)
    payload = {"model": "chat", "max_tokens": 3, "stream": True, "messages": [
        {"role": "system", "content": system_prompt(2)}, {"role": "user", "content": "streamed"}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=30) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()
    recs = gw.records()
    assert len(recs) == 2
    for rec in recs:
        assert rec["cached_tokens"] == 40
        assert rec["prefix_saved_pico_usd"] == 40 * 750_000  # exact: 0.75 USD / 1M tokens = 750,000 pico-USD each
        assert rec["prefix_saved_usd"] == pytest.approx(40 * 0.75e-6)
    m = gw.metrics()
    assert metric_value(m, "gateway_cached_prompt_tokens_total", model="chat") == 80
    assert metric_value(m, "gateway_prefix_saved_usd_total", model="chat") == pytest.approx(80 * 0.75e-6)
    # no cached-prompt price configured (it defaults to the prompt price): nothing is saved in money
    plain = config(replicas)
    del plain["models"]["chat"]["prices"]["cached_prompt_per_1m"]
    gw2 = gateway_factory(plain)
    r2 = ask(gw2, system_prompt(2), "and now?")
    assert r2.headers["x-gateway-cached-tokens"] == "40" and "x-gateway-prefix-saved-usd" not in r2.headers


def test_an_open_circuit_breaker_takes_no_affinity_traffic(gateway_factory: Callable[..., GatewayProcess],
                                                           replicas: list[FakeUpstream]) -> None:
    cfg = config(replicas)
    cfg["circuit_breaker"] = {"failures": 2, "cooldown_s": 30}
    gw = gateway_factory(cfg)
    home = ask(gw, system_prompt(8), "first").headers["x-gateway-deployment"]
    fake = replicas[int(home[1:])]
    fake.control(fail_status=503)
    for i in range(2):  # two failures open home's breaker; each request is served by the next deployment
        assert ask(gw, system_prompt(8), f"fails {i}").headers["x-gateway-fallback-reason"] == "upstream_503"
    fake.control(fail_status=0)
    r = ask(gw, system_prompt(8), "breaker open")
    assert r.headers["x-gateway-deployment"] != home and "x-gateway-fallback-reason" not in r.headers
    assert [a["outcome"] for a in gw.records()[-1]["attempts"]] == ["ok"]  # home was not even tried


def test_the_index_follows_what_vllm_reports() -> None:
    """In-process: the index shrinks when vLLM finds far less cached than predicted, and is capped by its KV size."""
    from gateway.routing.balance import TRUST_WINDOW_BLOCKS, PrefixAffinity
    from gateway.routing.live import DeploymentLive

    spec = PrefixRoutingSpec(block_chars=BLOCK, index_blocks=4096)
    p = PrefixAffinity(spec, ["r0"], None)
    idx = p.indexes["r0"]
    live = DeploymentLive()
    for _ in range(TRUST_WINDOW_BLOCKS // 16):  # the same 16 blocks again and again: we predict ~94 % cached
        idx.add(list(range(16)), idx.matched(list(range(16))), 0.0)
    idx.add(list(range(1000, 1600)), 0, 0.0)  # and 600 other blocks
    assert len(idx.blocks) == 616 and idx.capacity == 4096
    p.observe_engine("r0", live, hits=100.0, queries=10_000.0, reset=False)  # vLLM: 1 % hits
    assert idx.capacity == 2048 and len(idx.blocks) == 616  # halved (still above what it holds)
    # vLLM's KV cache: 12 blocks of 128 tokens = 1536 tokens ~ 9216 characters (at 6 a token) = 144 blocks of 64
    live.kv_capacity_tokens = 1536
    p.observe_engine("r0", live, hits=0.0, queries=0.0, reset=False)
    assert idx.capacity == idx.max_capacity == 144 and len(idx.blocks) == 144
    # the least recently sent went first, tail blocks before head blocks (as vLLM evicts)
    assert idx.matched(list(range(16))) == 0 and idx.matched(list(range(1000, 1600))) == 144
    p.observe_engine("r0", live, hits=0.0, queries=0.0, reset=True)
    assert not idx.blocks


def test_an_overflowing_index_drops_a_prefix_tail_first() -> None:
    """In-process: like vLLM (which frees a request's blocks in reverse order), an index over its capacity
    drops the least recently sent prompt's last blocks first, so its leading blocks still match."""
    from gateway.routing.balance import DeploymentIndex

    idx = DeploymentIndex(capacity=24)
    a, b = list(range(16)), list(range(100, 116))  # two applications' prompts, 16 chained blocks each
    idx.add(a, 0, 0.0)
    idx.add(b, 0, 0.0)  # 32 blocks > 24: 8 of a's go
    assert len(idx.blocks) == 24
    assert idx.matched(a) == 8 and idx.matched(b) == 16  # a keeps its first 8 (head first, it would match 0)
    idx.add(a[:8] + list(range(200, 208)), 8, 0.0)  # a's next request: its head is the most recent now
    assert idx.matched(a[:8]) == 8 and idx.matched(b) == 8


def test_a_spill_never_goes_back_to_the_deployment_over_its_bound() -> None:
    """In-process: the prefix's home is over the rate bound but has the fewest requests in flight; the spill
    goes to another deployment (least loaded among the rest), not back to the one it relieves."""
    from gateway.config import Deployment, Timeouts
    from gateway.routing.balance import PrefixAffinity, prefix_blocks
    from gateway.upstream import DeploymentState

    spec = PrefixRoutingSpec(block_chars=BLOCK, rate_factor=1.2)
    p = PrefixAffinity(spec, ["r0", "r1", "r2"], None)
    states = [DeploymentState(Deployment(f"r{i}", f"http://127.0.0.1:{9000 + i}", "m", 1.0, 8, Timeouts(), None),
                              None, None, None, {}) for i in range(3)]  # type: ignore[arg-type]
    body = {"messages": [{"role": "system", "content": system_prompt(1)}, {"role": "user", "content": "q"}]}
    blocks = prefix_blocks(body, BLOCK, spec.max_blocks)
    home = p.indexes["r0"]
    home.add(blocks, 0, time.monotonic())
    home.recent = 30.0  # r0 served the application lately, far beyond the others (0): over the rate bound
    states[1].in_flight, states[2].in_flight = 3, 2  # ...and r0 has the fewest requests in flight
    order = p.order(list(states), body, None)
    assert order[0].name == "r2"  # before the fix: r0, the deployment the spill was meant to relieve
