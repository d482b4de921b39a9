"""Dashboards and Prometheus rules: valid files, alert unit tests, and every panel query against a real Prometheus.

The live test starts Redis, two fake vLLM servers and a gateway as real processes, plus a real Prometheus
(Debian's `prometheus` package, installed by scripts/test.sh) scraping the gateway and the fakes every
second with the rules from deploy/prometheus/. It drives traffic that makes every series exist (errors,
fallbacks, an open breaker, streams, several tenants, cache hits, rate-limit and budget refusals, Redis
errors, dropped ledger records), then runs each target of each panel of each dashboard, with the template
variables substituted by their "All" value, and requires data. Queries on vLLM-only metrics that the
fake does not export are skipped here, with the reason, and run against real vLLM in
tests/test_dashboards_vllm.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from dashboards import build
from tests.conftest import ROOT, FakeUpstream, free_port, start_fake_upstream, start_gateway, stop, wait_http
from tests.test_task_routing import examples_file

RULES_DIR = ROOT / "deploy" / "prometheus"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

# vLLM metrics that gateway/testing/fake_vllm.py does not export (real vLLM does).
VLLM_ONLY = re.compile(r"vllm[:_](time_to_first_token_seconds|inter_token_latency_seconds|e2e_request_latency_seconds"
                       r"|request_queue_time_seconds|num_preemptions|prefix_cache)")


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((ROOT / "dashboards" / name).read_text()) for name in build.DASHBOARD_SPECS}


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard.removesuffix('.json')}/{self.panel}/{self.ref}"


def all_targets() -> list[Target]:
    return [Target(name, p["title"], t["refId"], t["expr"])
            for name, d in dashboards().items() for p in d["panels"] for t in p["targets"]]


def substitute(expr: str, dashboard: dict[str, Any], range_s: int) -> str:
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            expr = expr.replace(f"${v['name']}", v["allValue"])
    return expr.replace("$__rate_interval", "1m").replace("$__range", f"{range_s}s")


# =============================================================================== files

def test_generated_files_are_up_to_date() -> None:
    assert build.main(["--check"]) == 0, "run: python -m dashboards.build"


@pytest.mark.parametrize("name", list(build.DASHBOARD_SPECS))
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    d = dashboards()[name]
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    assert len({x["uid"] for x in dashboards().values()}) == len(build.DASHBOARD_SPECS)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) >= {"datasource", "model", "deployment", "tenant"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert v["includeAll"] and v["allValue"] == ".+", "All must still require the label"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = set()
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
            used |= set(re.findall(r"\$(\w+)", t["expr"]))
    assert {"model", "deployment", "tenant"} <= used, "every template variable is used by some panel"
    assert used <= set(variables) | {"__rate_interval", "__range"}


def test_recorded_series_used_by_panels_are_defined() -> None:
    recorded = {r["record"] for g in yaml.safe_load(build.RULES_FILE.read_text())["groups"] for r in g["rules"]}
    for t in all_targets():
        for name in re.findall(r"[a-z_]+:[a-z0-9_:]+(?=\{)", t.expr):
            if not name.startswith("vllm:"):
                assert name in recorded, f"{t.id}: {name} is not a recording rule"


# =============================================================================== rules

def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def test_promtool_check_rules() -> None:
    r = subprocess.run([PROMTOOL, "check", "rules", *map(str, rule_files())], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = subprocess.run([PROMTOOL, "test", "rules", "tests/alerts_test.yml"], cwd=RULES_DIR, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def alerts() -> list[dict[str, Any]]:
    return [r for f in rule_files() for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def test_every_alert_is_documented_and_unit_tested() -> None:
    runbook = RUNBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", runbook, re.M)}
    tests = yaml.safe_load((RULES_DIR / "tests" / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    required = {"GatewayTTFTBudgetBurnFast", "GatewayTTFTBudgetBurnSlow", "GatewayErrorRatioHigh",
                "GatewayFallbackRatioHigh", "GatewayDeploymentDown", "GatewayCircuitBreakerOpen",
                "VLLMKVCacheUsageHigh", "GatewayTenantBudget80PercentSpent", "GatewayTenantBudgetExhausted",
                "GatewayRedisUnreachable", "GatewayLedgerRecordsDropped"}
    assert required <= set(names)
    for a in alerts():
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), a["alert"]
        assert a["labels"].get("severity"), a["alert"]
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor == a["alert"].lower() and anchor in anchors, a["alert"]
        mine = [c for c in cases if c["alertname"] == a["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{a['alert']}: no unit test makes it fire"
        assert any(not c["exp_alerts"] for c in mine), f"{a['alert']}: no unit test keeps it silent"


# =============================================================================== live Prometheus

@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=30)
        body = r.json()
        assert body.get("status") == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=1)["result"]


def start_prometheus(tmp: Path, jobs: list[dict[str, Any]]) -> Prometheus:
    """A real Prometheus scraping `jobs` every second, with deploy/prometheus's rules evaluated every second."""
    rules = []
    for f in rule_files():
        doc = yaml.safe_load(f.read_text())
        for g in doc["groups"]:
            g["interval"] = "1s"
        (tmp / f.name).write_text(yaml.safe_dump(doc))
        rules.append(str(tmp / f.name))
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
           "rule_files": rules, "scrape_configs": jobs}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 (kept open for the process)
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/-/ready", proc=proc)
    return Prometheus(url, proc)


def hostport(url: str) -> str:
    return url.removeprefix("http://")


def start_redis(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


KEYS = {"team-a": "sk-dash-a", "team-b": "sk-dash-b", "team-c": "sk-dash-c"}


def gateway_config(big: str, small: str, redis_url: str, emb: str = "", examples: str = "",
                   adapters: dict[str, str] | None = None) -> dict[str, Any]:
    adapters = adapters or {}
    return {
        "auth": {"keys": [{"tenant": t, "key": k} for t, k in KEYS.items()]},
        "models": {
            "big": {"tier": "large", "prices": {"prompt_per_1m": 10, "completion_per_1m": 30},
                    "deployments": [{"name": "big-0", "url": big, "model": "big-base", "fair_queue": {},
                                     "timeouts": {"connect": 1, "first_token": 2, "total": 10}}]},
            # two deployments of one engine: the balance policy has a choice to make (and to count)
            "small": {"tier": "small", "balance": "prefix",
                      "prices": {"prompt_per_1m": 1, "completion_per_1m": 2, "cached_prompt_per_1m": 0.25},
                      "deployments": [{"name": "small-0", "url": small, "model": "small-base"},
                                      {"name": "small-1", "url": small, "model": "small-base", "adapter_slots": 1}]},
            "nlu": {"tier": "adapter", "prices": {"prompt_per_1m": 0.5, "completion_per_1m": 1},
                    "deployments": [{"name": "nlu-0", "url": small, "model": "nlu-adapter"}]},
            **({"emb": {"tier": "small", "prices": {"prompt_per_1m": 0.1},
                        "deployments": [{"name": "emb-0", "url": emb, "model": "emb"}]}} if emb else {}),
        },
        "routes": {"assistant": {"candidates": ["big", "small", "nlu"], "tasks": {"classification": "nlu"}},
                   # automatic task routing (its own route: the assistant's traffic above stays as it is)
                   **({"helpdesk": {"candidates": ["small", "nlu"], "tasks": {"sentiment": "nlu"},
                                    "task_auto": {"embedding": "emb", "examples": {"sentiment": examples},
                                                  "deadline_ms": 2000}}} if emb else {})},
        # LoRA adapters loaded on demand onto small-1 (one slot: each switch evicts), the loads billed
        **({"adapters": {n: {"base": "small", "path": p} for n, p in adapters.items()},
            "adapter_placement": {"load_usd_per_hour": 3.6, "sync_interval_s": 3600}} if adapters else {}),
        "circuit_breaker": {"failures": 2, "cooldown_s": 3.0},
        "metrics_scrape_interval": 0.5,
        "redis": {"url": redis_url, "timeout_s": 0.2, "down_for_s": 0.2, "ledger_buffer": 2,
                  "ledger_flush_interval_s": 0.1},
        "ledger": {"spool_path": "off"},  # the drops panel needs drops: no spool to take the records
        "cache": {"mode": "deterministic"},
        # team-b: its one request ("b0", max_tokens 200) reserves 114 prompt tokens (byte bound: 2 + 16 per
        # message + 96 for the template) + 200 completion = $0.000514 at small's prices and spends ~$0.0004: the
        # next request's reservation no longer fits
        # team-a's class has a TTFT objective its streams meet (the fairness panels' series)
        "priority_classes": {"interactive": {"priority": 0, "ttft_slo_ms": 60000}, "standard": {"priority": 10}},
        "tenants": {"team-a": {"priority_class": "interactive"},
                    "team-b": {"limits": {"budget_day_usd": 0.00052, "budget_month_usd": 100}},
                    "team-c": {"limits": {"rpm": 4, "budget_day_usd": 50}}},
    }


def drive_traffic(gw_url: str, big: FakeUpstream, small: FakeUpstream, redis: subprocess.Popen[bytes],
                  emb: FakeUpstream | None = None) -> None:
    def chat(tenant: str, model: str = "assistant", stream: bool = False, max_tokens: int = 6,
             content: str = "hello", **body: Any) -> int:
        r = httpx.post(gw_url + "/v1/chat/completions", timeout=30, headers={
            "Authorization": f"Bearer {KEYS[tenant]}", "Content-Type": "application/json"}, content=orjson.dumps(
            {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
             "stream": stream, **body}))
        return r.status_code

    for f in (big, small):
        f.control(ttft_ms=40, itl_ms=4)
    small.control(cached_tokens=3)  # vLLM's prefix cache served part of each prompt: billed cheaper, saving counted
    for i in range(3):  # normal traffic, streams and not, every model, two tenants
        for model in ("assistant", "big", "small", "nlu"):
            for stream in (False, True):
                assert chat("team-a", model, stream, content=f"q{i} {model}") == 200
        assert chat("team-b" if i == 0 else "team-a", "small", content=f"b{i}", max_tokens=200) == 200
    for _ in range(3):  # the same deterministic request: a miss, then hits
        assert chat("team-a", "small", temperature=0, content="cache me") == 200
        assert chat("team-a", "small", True, temperature=0, content="cache my stream") == 200
    for i in range(2):  # routing by policy: classification goes to the adapter (not an alerting fallback)
        assert chat("team-a", metadata={"task": "classification"}, content=f"classify {i}") == 200
    if emb is not None:  # automatic task routing: routed, kept on the default, declared, the classifier away
        deadline = time.monotonic() + 30
        while 'gateway_task_classifier_ready{route="helpdesk"} 1.0' not in httpx.get(gw_url + "/metrics").text:
            assert time.monotonic() < deadline, "task classifier not fitted"
            time.sleep(0.1)
        for i in range(3):
            assert chat("team-a", "helpdesk", content=f"Is this review positive or negative? It was great {i}.") == 200
            assert chat("team-a", "helpdesk", content=f"Write a short story about a sofa {i}.") == 200
        assert chat("team-a", "helpdesk", content="Write a poem.", metadata={"task": "sentiment"}) == 200
        emb.control(fail_status=503)
        assert chat("team-a", "helpdesk", content="Classify the sentiment of this review: awful.") == 200
        emb.control(fail_status=0)
    for name in ("tone-a", "tone-b", "tone-a"):  # adapters: three cold loads, two evictions
        assert chat("team-a", name, content=f"adapter {name}") == 200
    small.control(load_fail_status=500)  # a failed load: the request has no other engine
    assert chat("team-a", "tone-b", content="adapter load fails") >= 500
    small.control(load_fail_status=0)
    statuses = [chat("team-c", "nlu", content=f"c{i}") for i in range(7)]  # rpm 4
    assert 429 in statuses and 200 in statuses, statuses
    assert chat("team-b", "small", content="over budget?") == 429  # team-b's day budget is spent
    big.control(fail_status=503)  # fallbacks to small, the breaker of big-0 opens; direct calls fail
    for i in range(4):
        assert chat("team-a", stream=bool(i % 2), content=f"fb{i}") == 200
        assert chat("team-a", "big", content=f"err{i}") >= 500
    big.control(healthy=False)
    time.sleep(2.0)  # the health checker (0.5 s) marks big-0 down
    stop(redis)  # Redis goes away: cache/limit errors, the ledger buffer (2 records) overflows
    for i in range(6):
        chat("team-a", "small", content=f"noredis{i}")
    big.control(fail_status=0, healthy=True, ttft_ms=0, itl_ms=0)
    small.control(ttft_ms=0, itl_ms=0, cached_tokens=0)


@dataclass
class Live:
    prom: Prometheus
    start: float
    end: float
    results: dict[str, list[dict[str, Any]]]
    fake_metrics: set[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("dash")
    big = start_fake_upstream(["big-base"])
    small = start_fake_upstream(["small-base", "nlu-adapter"])
    emb = start_fake_upstream(["emb"])
    redis_url, redis = start_redis(tmp)
    adapter_dirs = {name: tmp / f"lora-{name}" for name in ("tone-a", "tone-b")}
    for d in adapter_dirs.values():
        d.mkdir()
    gw = start_gateway(tmp, gateway_config(big.url, small.url, redis_url, emb.url, str(examples_file(tmp)),
                                           {n: str(d) for n, d in adapter_dirs.items()}))
    jobs = [{"job_name": "gateway", "static_configs": [{"targets": [hostport(gw.url)]}]},
            {"job_name": "vllm", "static_configs": [
                {"targets": [hostport(big.url)], "labels": {"deployment": "big-0"}},
                {"targets": [hostport(small.url)], "labels": {"deployment": "small-0"}}]}]
    prom = start_prometheus(tmp, jobs)
    try:
        start = time.time()
        time.sleep(2)
        drive_traffic(gw.url, big, small, redis, emb)
        fake_metrics = {line.split("{")[0] for line in httpx.get(big.url + "/metrics").text.splitlines()
                        if line and not line.startswith("#")}
        targets = [t for t in all_targets() if not VLLM_ONLY.search(t.expr)]
        results: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 40  # rules and rates need a few scrapes/evaluations after the traffic
        while True:
            end = time.time()
            rng = int(end - start) + 5
            ds = dashboards()
            results = {t.id: prom.query_range(substitute(t.expr, ds[t.dashboard], rng), start, end) for t in targets}
            if all(results.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        yield Live(prom, start, end, results, fake_metrics)
    finally:
        for p in (prom.proc, gw.proc, redis):
            stop(p)
        big.kill()
        small.kill()
        emb.kill()


@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.id)
def test_panel_query_returns_data(live: Live, target: Target) -> None:
    if VLLM_ONLY.search(target.expr):
        metric = VLLM_ONLY.search(target.expr).group(0)  # type: ignore[union-attr]
        assert not any(VLLM_ONLY.search(m) for m in live.fake_metrics), "the fake exports it now: test it here"
        pytest.skip(f"{metric}: exported by real vLLM only, not by the fake upstream; "
                    "checked against real vLLM in tests/test_dashboards_vllm.py")
    assert live.results[target.id], f"no data for {target.id}:\n{target.expr}"


def test_traffic_made_the_interesting_values_happen(live: Live) -> None:
    """Not just series that exist: an open breaker, a down deployment, hits, refusals, Redis errors, drops."""
    def peak(expr: str) -> float:
        res = live.prom.query_range(expr, live.start, live.end)
        return max((float(v) for s in res for _, v in s["values"]), default=0.0)

    assert peak('max(gateway_circuit_breaker_state{deployment="big-0"})') == 2
    assert peak('1 - min(gateway_upstream_healthy{deployment="big-0"})') == 1, "big-0 never down"
    assert peak('sum(gateway_cache_requests_total{result="hit"})') >= 2
    assert peak('sum(gateway_ratelimit_refusals_total{tenant="team-c"})') >= 1
    assert peak('sum(gateway_ratelimit_refusals_total{tenant="team-b"})') >= 1
    assert peak("sum(gateway_redis_errors_total)") >= 1
    assert peak("sum(gateway_ledger_dropped_total)") >= 1
    assert peak('sum(gateway_fallbacks_total{from_model="big", to_model="small"})') >= 4
    assert peak('sum(gateway_requests_total{status=~"5.."})') >= 4
    # team-b is refused once spend + the next reservation would pass its budget: well over half spent
    assert peak("gateway_tenant_spend_usd / gateway_tenant_budget_usd") >= 0.5


def test_template_variables_have_values(live: Live) -> None:
    for d in dashboards().values():
        for v in d["templating"]["list"]:
            if v["type"] != "query":
                continue
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"]["query"]).groups()  # type: ignore[union-attr]
            series = live.prom.get("/api/v1/series", **{"match[]": metric, "start": live.start, "end": live.end})
            assert {s.get(label) for s in series} - {None}, f"{v['name']}: no values"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
