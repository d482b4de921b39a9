"""Writes dashboards/*.json (Grafana) and deploy/prometheus/gateway-recording.yml from the Python below.

    python -m dashboards.build            # rewrite the files
    python -m dashboards.build --check    # exit 1 if a checked-in file differs from what this writes

Panels read the recording rules defined here (RULES) where one exists, so the dashboards and the
rules cannot drift apart. Every query filters with the template variables; a variable's "All" is
`.+`, so a filter on a label a metric does not carry matches nothing (and the tests notice).
vLLM series carry a `deployment` label added by the scrape config (deploy/prometheus/README.md),
equal to the gateway's name for the deployment that engine serves.

Why the JSON is written here and not with Grafana's typed builder (grafana-foundation-sdk): every
panel is one row of a table that also defines the recording rule it reads and the promtool/Prometheus
tests that query it; the builder would add a second description of each panel next to that table.
Instead tests/test_dashboards_schema.py loads every written dashboard into the SDK's typed models and
fails on any field Grafana's schema does not know, which is the check the builder would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES_FILE = ROOT / "deploy" / "prometheus" / "gateway-recording.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

# TTFT SLO: this share of streamed requests gets its first token within the threshold.
TTFT_SLO_SECONDS = 1.0
TTFT_SLO_OBJECTIVE = 0.99
# The SLO is about streams vLLM served: cache hits (deployment="_none", answered in ~1 ms) are left out,
# or a cache-heavy hour would hide a slow engine. They have their own panel.
SERVED = 'deployment!="_none"'
# Fallback reasons that are routing policy, not trouble (gateway/routing/policy.py): not alerted on.
POLICY_REASONS = "task|task_auto|context_length|budget_pressure"
LE_1S = 'le=~"1|1\\\\.0"'  # Prometheus 2 keeps le="1.0" from prometheus-client; Prometheus 3 normalises it to "1"

# ------------------------------------------------------------------------------------- recording rules

MDT = "model, deployment, tenant"
_RATES = [  # (record name, expression) with a 1m rate
    ("model_deployment_tenant_status:gateway_requests:rate1m",
     f"sum by ({MDT}, status) (rate(gateway_requests_total[1m]))"),
    *[(f"model_deployment_tenant:gateway_{m}:rate1m", f"sum by ({MDT}) (rate(gateway_{m}_total[1m]))")
      for m in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "cost_usd", "counterfactual_cost_usd",
                "prefix_saved_usd")],
    ("model_deployment_decision:gateway_balance_decisions:rate1m",
     "sum by (model, deployment, decision) (rate(gateway_balance_decisions_total[1m]))"),
    ("from_model_to_model_reason:gateway_fallbacks:rate1m",
     "sum by (from_model, to_model, reason) (rate(gateway_fallbacks_total[1m]))"),
    ("model_tenant_result:gateway_cache_requests:rate1m",
     "sum by (model, tenant, result) (rate(gateway_cache_requests_total[1m]))"),
    ("model_tenant:gateway_cache_saved_usd:rate1m", "sum by (model, tenant) (rate(gateway_cache_saved_usd_total[1m]))"),
    ("tenant_limit:gateway_ratelimit_refusals:rate1m",
     "sum by (tenant, limit) (rate(gateway_ratelimit_refusals_total[1m]))"),
    ("operation:gateway_redis_errors:rate1m", "sum by (operation) (rate(gateway_redis_errors_total[1m]))"),
    ("deployment:vllm_prompt_tokens:rate1m", "sum by (deployment) (rate(vllm:prompt_tokens_total[1m]))"),
    ("deployment:vllm_generation_tokens:rate1m", "sum by (deployment) (rate(vllm:generation_tokens_total[1m]))"),
    ("deployment:vllm_num_preemptions:rate1m", "sum by (deployment) (rate(vllm:num_preemptions_total[1m]))"),
]
GATEWAY_HISTOGRAMS = {"e2e": "gateway_request_duration_seconds", "ttft": "gateway_time_to_first_token_seconds",
                      "tpot": "gateway_time_per_output_token_seconds", "overhead": "gateway_overhead_seconds",
                      "queue": "gateway_queue_seconds"}
VLLM_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "itl": "vllm:inter_token_latency_seconds",
                   "e2e": "vllm:e2e_request_latency_seconds", "queue": "vllm:request_queue_time_seconds"}
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
SLO_WINDOWS = ("5m", "30m", "1h", "6h")


def pct_record(metric: str, q: str) -> str:
    """Recording rule name of quantile q (p50/p95/p99) of a histogram, by deployment (and model for the gateway)."""
    if metric.startswith("vllm:"):
        return f"deployment:{metric.replace(':', '_')}:{q}_5m"
    return f"model_deployment:{metric}:{q}_5m"


def recording_rules() -> dict[str, Any]:
    pct = []
    for metric in GATEWAY_HISTOGRAMS.values():
        for q, v in QUANTILES.items():
            pct.append({"record": pct_record(metric, q), "expr":
                        f"histogram_quantile({v}, sum by (model, deployment, le) (rate({metric}_bucket[5m])))"})
    for metric in VLLM_HISTOGRAMS.values():
        for q, v in QUANTILES.items():
            pct.append({"record": pct_record(metric, q), "expr":
                        f"histogram_quantile({v}, sum by (deployment, le) (rate({metric}_bucket[5m])))"})
    ratios = [
        {"record": "model:gateway_requests_errors:ratio_rate5m",
         "expr": 'sum by (model) (rate(gateway_requests_total{status=~"5.."}[5m]))\n'
                 "/ sum by (model) (rate(gateway_requests_total[5m]))"},
        # Fallbacks forced by trouble (a failing, saturated or too slow first candidate) vs routing policy
        # (task, context length, budget pressure): only the first kind alerts.
        {"record": "gateway:fallbacks_degraded:ratio_rate10m",
         "expr": f'(sum(rate(gateway_fallbacks_total{{reason!~"{POLICY_REASONS}"}}[10m])) or vector(0))\n'
                 "/ sum(rate(gateway_requests_total[10m]))"},
        {"record": "gateway:fallbacks_policy:ratio_rate10m",
         "expr": f'(sum(rate(gateway_fallbacks_total{{reason=~"{POLICY_REASONS}"}}[10m])) or vector(0))\n'
                 "/ sum(rate(gateway_requests_total[10m]))"},
        {"record": "deployment:vllm_prefix_cache_hits:ratio_rate5m",
         "expr": "sum by (deployment) (rate(vllm:prefix_cache_hits_total[5m]))\n"
                 "/ sum by (deployment) (rate(vllm:prefix_cache_queries_total[5m]))"},
        *[{"record": f"model:gateway_ttft_slo_errors:ratio_rate{w}",
           "expr": f"1 - sum by (model) (rate(gateway_time_to_first_token_seconds_bucket{{{LE_1S}, {SERVED}}}[{w}]))\n"
                   f"/ sum by (model) (rate(gateway_time_to_first_token_seconds_count{{{SERVED}}}[{w}]))"}
          for w in SLO_WINDOWS],
    ]
    return {"groups": [
        {"name": "gateway-rates", "interval": "15s", "rules": [{"record": r, "expr": e} for r, e in _RATES]},
        {"name": "gateway-latency-percentiles", "interval": "15s", "rules": pct},
        {"name": "gateway-ratios", "interval": "15s", "rules": ratios},
    ]}


# ------------------------------------------------------------------------------------------ panels

@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 8
    height: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def ts(title: str, *targets: tuple[str, str], unit: str = "short", desc: str = "", width: int = 8,
       **extra: Any) -> Panel:
    return Panel(title, list(targets), unit, "timeseries", desc, width, extra=extra)


M, D, T = 'model=~"$model"', 'deployment=~"$deployment"', 'tenant=~"$tenant"'
MD, MDT_F = f"{M}, {D}", f"{M}, {D}, {T}"
NON2XX, OK2XX = 'status!~"2.."', 'status=~"2.."'


def rate(metric: str, by: str, flt: str = MDT_F, extra: str = "") -> str:
    """Sum of a recorded 1m rate."""
    sel = ", ".join(x for x in (flt, extra) if x)
    return f"sum by ({by}) ({metric}{{{sel}}})"


REQ = "model_deployment_tenant_status:gateway_requests:rate1m"
PROMPT = "model_deployment_tenant:gateway_prompt_tokens:rate1m"
COMPL = "model_deployment_tenant:gateway_completion_tokens:rate1m"
COST = "model_deployment_tenant:gateway_cost_usd:rate1m"
CF_COST = "model_deployment_tenant:gateway_counterfactual_cost_usd:rate1m"
PREFIX_SAVED = "model_deployment_tenant:gateway_prefix_saved_usd:rate1m"
DECISIONS = "model_deployment_decision:gateway_balance_decisions:rate1m"


def latency(title: str, metric: str, flt: str = f'{MD}, deployment!="_none"', desc: str = "") -> Panel:
    return ts(title, *[(f"{pct_record(metric, q)}{{{flt}}}", f"{q} {{{{model}}}} @ {{{{deployment}}}}")
                       for q in QUANTILES], unit="s", desc=desc)


BREAKER_MAPPING = [{"type": "value", "options": {"0": {"text": "closed", "color": "green"},
                                                  "1": {"text": "half-open", "color": "orange"},
                                                  "2": {"text": "open", "color": "red"}}}]


def gateway_overview() -> list[Panel]:
    return [
        ts("Requests/s by model and status", (rate(REQ, "model, status"), "{{model}} {{status}}"), unit="reqps"),
        ts("Error ratio by model and status (non-2xx)",
           (f'{rate(REQ, "model, status", extra=NON2XX)}\n'
            f'/ ignoring(status) group_left {rate(REQ, "model")}', "{{model}} {{status}}"),
           unit="percentunit", desc="Share of each model's requests that ended with this status"),
        ts("Requests in flight", (f"sum by (model) (gateway_requests_in_flight{{{M}}})", "{{model}}")),
        latency("End-to-end latency", GATEWAY_HISTOGRAMS["e2e"]),
        latency("Time to first token (streams)", GATEWAY_HISTOGRAMS["ttft"],
                desc="Streams served by vLLM (the TTFT SLO's population); cache hits have their own panel"),
        ts("Time to first token: cache hits (streams)",
           *[(f'{pct_record(GATEWAY_HISTOGRAMS["ttft"], q)}{{{M}, deployment="_none"}}', f"{q} {{{{model}}}}")
             for q in QUANTILES], unit="s", desc="Answered from the gateway cache; not part of the TTFT SLO"),
        latency("Time per output token (streams)", GATEWAY_HISTOGRAMS["tpot"]),
        latency("Gateway overhead", GATEWAY_HISTOGRAMS["overhead"], flt=MD,
                desc="Time not spent waiting on vLLM or for a deployment slot (refused requests included)"),
        latency("Queue time (waiting for a deployment slot)", GATEWAY_HISTOGRAMS["queue"]),
        ts("Tokens/s in and out", (rate(PROMPT, "model"), "in {{model}}"), (rate(COMPL, "model"), "out {{model}}")),
        ts("Cost USD/hour by model", (f'{rate(COST, "model")} * 3600', "{{model}}"), unit="currencyUSD"),
        ts("Cost USD/hour by tenant", (f'{rate(COST, "tenant")} * 3600', "{{tenant}}"), unit="currencyUSD"),
        ts("Spend today vs daily budget",
           (f'max by (tenant) (gateway_tenant_spend_usd{{{T}, period="day"}})', "spent {{tenant}}"),
           (f'max by (tenant) (gateway_tenant_budget_usd{{{T}, period="day"}})', "budget {{tenant}}"),
           unit="currencyUSD"),
        ts("Cache hit ratio",
           (f'sum by (model) (model_tenant_result:gateway_cache_requests:rate1m{{{M}, {T}, result="hit"}})\n'
            f"/ sum by (model) (model_tenant_result:gateway_cache_requests:rate1m{{{M}, {T}}})", "{{model}}"),
           unit="percentunit"),
        ts("Cache: USD saved/hour",
           (f"sum by (model) (model_tenant:gateway_cache_saved_usd:rate1m{{{M}, {T}}}) * 3600", "{{model}}"),
           unit="currencyUSD"),
        ts("Fallbacks/s forced by trouble (failure, overload, deadline)",
           ('sum by (from_model, to_model, reason) (from_model_to_model_reason:gateway_fallbacks:rate1m'
            f'{{from_model=~"$model", reason!~"{POLICY_REASONS}"}})', "{{from_model}} -> {{to_model}} ({{reason}})"),
           unit="reqps", desc="What GatewayFallbackRatioHigh alerts on"),
        ts("Routing by policy/s (task, context length, budget pressure)",
           ('sum by (from_model, to_model, reason) (from_model_to_model_reason:gateway_fallbacks:rate1m'
            f'{{from_model=~"$model", reason=~"{POLICY_REASONS}"}})', "{{from_model}} -> {{to_model}} ({{reason}})"),
           unit="reqps", desc="Requests sent to another model by design; not an alert"),
        ts("Circuit breaker state", (f"max by (deployment) (gateway_circuit_breaker_state{{{D}}})",
                                     "{{deployment}}"), desc="0 closed, 1 half-open, 2 open",
           mappings=BREAKER_MAPPING),
        ts("Upstream health", (f"min by (deployment) (gateway_upstream_healthy{{{D}}})", "{{deployment}}"),
           desc="1 when the deployment's /health answers", mappings=[{"type": "value", "options": {
               "0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}]),
        ts("Rate-limit and budget refusals/s",
           (f"sum by (tenant, limit) (tenant_limit:gateway_ratelimit_refusals:rate1m{{{T}}})",
            "{{tenant}} {{limit}}"), unit="reqps"),
        ts("Redis errors/s", ('sum by (operation) (operation:gateway_redis_errors:rate1m{operation=~".+"})',
                              "{{operation}}")),
        ts("Usage ledger: buffered and dropped",
           ("sum(gateway_ledger_buffered)", "buffered"),
           ("sum(increase(gateway_ledger_dropped_total[$__rate_interval]))", "dropped")),
        *task_routing(),
    ]


TASK_AUTO = 'gateway_route_decisions_total{rule="task_auto"}'


def task_routing() -> list[Panel]:
    """The row of automatic task routing (docs/routing.md "Automatic task routing"): what was decided, how
    sure the classifier was, what deciding took, and what it saved."""
    def per_route(metric: str, flt: str = "") -> str:
        return f"sum by (route) (rate({metric}{{{flt}}}[$__rate_interval]))"

    return [
        ts("Task routing: decisions/s by outcome",
           (f"sum by (route, task, outcome) (rate({TASK_AUTO}[$__rate_interval]))", "{{route}} {{task}} {{outcome}}"),
           unit="reqps", desc="routed: sent to the task's model; below_threshold: stays on the default; declared: "
                              "the client named the task; deadline / unavailable / not_ready: the classifier could "
                              "not answer in time (the default route, never an error)"),
        ts("Task routing: share sent to a task's model",
           ('sum by (route) (rate(gateway_route_decisions_total{rule="task_auto", outcome="routed"}'
            "[$__rate_interval]))\n/ " + per_route("gateway_route_decisions_total", 'rule="task_auto"'), "{{route}}"),
           ('sum by (route) (rate(gateway_route_decisions_total{rule="task_auto", outcome=~"deadline|unavailable|'
            'not_ready"}[$__rate_interval]))\n/ ' + per_route("gateway_route_decisions_total", 'rule="task_auto"'),
            "{{route}} classifier missed"), unit="percentunit"),
        Panel("Task routing: classifier confidence (requests in the time range)",
              [("sum by (le) (increase(gateway_task_confidence_bucket[$__range]))", "<= {{le}}")], "short",
              "bargauge", "Cumulative: requests whose most likely task had at most this probability; the "
              "threshold splits them", width=8,
              extra={"options": {"displayMode": "gradient", "orientation": "horizontal",
                                 "reduceOptions": {"calcs": ["lastNotNull"]}}}),
        ts("Task routing: time the decision added",
           *[(f"histogram_quantile({v}, sum by (route, le) (rate(gateway_routing_seconds_bucket[$__rate_interval])))",
              f"{q} {{{{route}}}}") for q, v in QUANTILES.items()], unit="s",
           desc="The embedding call of task_auto, bounded by its deadline_ms"),
        ts("Task routing: saving USD/hour (counterfactual - billed, deciding included)",
           ("(" + per_route("gateway_task_auto_cost_usd_total", 'kind="counterfactual"') + "\n- "
            + per_route("gateway_task_auto_cost_usd_total", 'kind="billed"') + ") * 3600", "saved {{route}}"),
           (per_route("gateway_task_auto_cost_usd_total", 'kind="routing"') + " * 3600", "deciding {{route}}"),
           unit="currencyUSD", desc="What the route's default model would have charged, minus what was billed "
                                    "(the embedding calls included); negative: routing costs more than it saves"),
    ]


def vllm_engines() -> list[Panel]:
    def vs(title: str, vllm_metric: str, gw_metric: str, gw_name: str) -> Panel:
        return ts(title, *[(f"{pct_record(vllm_metric, q)}{{{D}}}", f"vLLM {q} {{{{deployment}}}}")
                           for q in ("p50", "p95", "p99")],
                  (f"{pct_record(gw_metric, 'p95')}{{{D}}}", f"gateway {gw_name} p95 {{{{deployment}}}}"), unit="s")
    return [
        ts("Requests running and waiting (vLLM)",
           (f"sum by (deployment) (vllm:num_requests_running{{{D}}})", "running {{deployment}}"),
           (f"sum by (deployment) (vllm:num_requests_waiting{{{D}}})", "waiting {{deployment}}")),
        ts("Concurrency (gateway's view)",
           (f'sum by (deployment) (rate(gateway_request_duration_seconds_sum{{{D}}}[$__rate_interval]))',
            "gateway {{deployment}}"), desc="Little's law: request rate x mean latency"),
        ts("KV-cache usage", (f"max by (deployment) (vllm:kv_cache_usage_perc{{{D}}})", "{{deployment}}"),
           unit="percentunit"),
        vs("Time to first token: vLLM vs gateway", VLLM_HISTOGRAMS["ttft"], GATEWAY_HISTOGRAMS["ttft"], "TTFT"),
        vs("Inter-token latency (vLLM) vs time per output token (gateway)", VLLM_HISTOGRAMS["itl"],
           GATEWAY_HISTOGRAMS["tpot"], "TPOT"),
        vs("End-to-end latency: vLLM vs gateway", VLLM_HISTOGRAMS["e2e"], GATEWAY_HISTOGRAMS["e2e"], "e2e"),
        vs("Queue time: vLLM scheduler vs gateway slot", VLLM_HISTOGRAMS["queue"], GATEWAY_HISTOGRAMS["queue"],
           "queue"),
        ts("Prompt tokens/s: vLLM vs gateway",
           (f"deployment:vllm_prompt_tokens:rate1m{{{D}}}", "vLLM {{deployment}}"),
           (rate(PROMPT, "deployment"), "gateway {{deployment}}")),
        ts("Generation tokens/s: vLLM vs gateway",
           (f"deployment:vllm_generation_tokens:rate1m{{{D}}}", "vLLM {{deployment}}"),
           (rate(COMPL, "deployment"), "gateway {{deployment}}")),
        ts("Preemptions/s", (f"deployment:vllm_num_preemptions:rate1m{{{D}}}", "{{deployment}}")),
        # prefix-cache-aware routing (docs/routing.md "Balance policies"): vLLM's hit ratio next to the choices
        ts("Prefix-cache hit ratio: vLLM vs gateway's cached prompt tokens",
           (f"deployment:vllm_prefix_cache_hits:ratio_rate5m{{{D}}}", "vLLM {{deployment}}"),
           (f'{rate("model_deployment_tenant:gateway_cached_prompt_tokens:rate1m", "deployment")}\n'
            f'/ {rate(PROMPT, "deployment")}', "gateway {{deployment}}"), unit="percentunit"),
        ts("Balance decisions/s by deployment",
           (f"sum by (deployment, decision) ({DECISIONS}{{{MD}}})", "{{deployment}} {{decision}}"), unit="reqps",
           desc="How the gateway chose among a model's deployments: affinity (prefix held there), spill (held "
                "by one over its load bound), new (prefix seen nowhere), short, least_outstanding"),
        ts("Load split: share of each model's requests by deployment",
           (f'{rate(REQ, "model, deployment")}\n/ ignoring(deployment) group_left {rate(REQ, "model")}',
            "{{model}} @ {{deployment}}"), unit="percentunit",
           desc="Prefix affinity must not pile one model's traffic onto one replica: compare with the weights"),
        ts("Requests/s by deployment and status (gateway)", (rate(REQ, "deployment, status"),
                                                              "{{deployment}} {{status}}"), unit="reqps"),
        *adapters(),
    ]


def adapters() -> list[Panel]:
    """LoRA adapters loaded on demand (docs/routing.md "LoRA adapters on demand"): loads and why, what each engine
    holds, what loading takes and costs, what was evicted."""
    e = 'engine=~"$deployment"'
    return [
        ts("Adapter loads/s by engine and reason",
           (f"sum by (engine, reason) (rate(gateway_adapter_loads_total{{{e}}}[$__rate_interval]))",
            "{{engine}} {{reason}}"),
           (f"sum by (engine, reason) (rate(gateway_adapter_load_failures_total{{{e}}}[$__rate_interval]))",
            "failed {{engine}} {{reason}}"), unit="ops",
           desc="cold: held nowhere; replica: a hot adapter onto one more engine; reload: the engine lost it "
                "(restart). Failures: timeout, error, not_found, slots_full (the request tries the next engine)"),
        ts("Adapters held per engine (max over workers)",
           (f"max by (engine) (gateway_adapters_held{{{e}}})", "{{engine}}"),
           desc="Against each deployment's adapter_slots: full slots with steady loads mean thrashing"),
        ts("Adapter load time",
           *[(f"histogram_quantile({v}, sum by (engine, le) "
              f"(rate(gateway_adapter_load_seconds_bucket{{{e}}}[$__rate_interval])))", f"{q} {{{{engine}}}}")
             for q, v in QUANTILES.items()], unit="s",
           desc="POST /v1/load_lora_adapter, as the first request for a cold adapter waits for it"),
        ts("Adapter evictions/s by reason",
           (f"sum by (engine, reason) (rate(gateway_adapter_evictions_total{{{e}}}[$__rate_interval]))",
            "{{engine}} {{reason}}"), unit="ops",
           desc="lru / random: to make room; idle: idle_unload_s; lost: gone from the engine"),
        ts("Adapter load cost USD/hour by who pays",
           (f"sum by (billed_to) (rate(gateway_adapter_load_cost_usd_total{{{e}}}[$__rate_interval])) * 3600",
            "{{billed_to}}"), unit="currencyUSD",
           desc="Engine time of loads at the configured rate: billed to the request that caused it, or the operator's"),
    ]


def cost_tenants() -> list[Panel]:
    tier_join = f'* on (model) group_left (tier) max by (model, tier) (gateway_model_info{{{M}}})'
    return [
        ts("Spend USD/hour by tenant", (f'{rate(COST, "tenant")} * 3600', "{{tenant}}"), unit="currencyUSD"),
        ts("Spend USD/hour by model", (f'{rate(COST, "model")} * 3600', "{{model}}"), unit="currencyUSD"),
        Panel("Spend in the time range by tenant and model",
              [(f"sum by (tenant, model) (increase(gateway_cost_usd_total{{{MDT_F}}}[$__range]))",
                "{{tenant}} {{model}}")], "currencyUSD", "bargauge", width=8,
              extra={"options": {"displayMode": "gradient", "orientation": "horizontal",
                                 "reduceOptions": {"calcs": ["lastNotNull"]}}}),
        ts("Cost per 1k tokens by model",
           (f'{rate(COST, "model")}\n/ ({rate(PROMPT, "model")} + {rate(COMPL, "model")}) * 1000', "{{model}}"),
           unit="currencyUSD"),
        ts("Share of requests by model tier",
           (f'sum by (tier) ({rate(REQ, "model", extra=OK2XX)} '
            f'{tier_join})\n/ scalar(sum({REQ}{{{MDT_F}, status=~"2.."}}))', "{{tier}}"), unit="percentunit",
           desc="Served (2xx) requests by the tier of the model that served them (gateway_model_info)"),
        ts("Requests/s by tier and tenant",
           (f'sum by (tier, tenant) ({rate(REQ, "model, tenant")} {tier_join})', "{{tier}} {{tenant}}"),
           unit="reqps"),
        ts("Savings USD/hour: cache, fallbacks and vLLM's prefix cache",
           (f"sum(model_tenant:gateway_cache_saved_usd:rate1m{{{M}, {T}}}) * 3600", "cache hits"),
           (f"(sum({CF_COST}{{{MDT_F}}}) - sum({COST}{{{MDT_F}}})) * 3600",
            "fallbacks and downgrades (counterfactual - billed)"),
           (f"sum({PREFIX_SAVED}{{{MDT_F}}}) * 3600",
            "vLLM prefix cache (cached tokens at the uncached price - billed)"),
           unit="currencyUSD"),
        ts("Counterfactual vs billed USD/hour by model",
           (f'{rate(CF_COST, "model")} * 3600', "counterfactual {{model}}"),
           (f'{rate(COST, "model")} * 3600', "billed {{model}}"), unit="currencyUSD"),
        ts("Budget used (share of day / month budget)",
           (f"max by (tenant, period) (gateway_tenant_spend_usd{{{T}}})\n"
            f"/ max by (tenant, period) (gateway_tenant_budget_usd{{{T}}})", "{{tenant}} {{period}}"),
           unit="percentunit"),
        *fairness(),
    ]


def fairness() -> list[Panel]:
    """Fair share, queue wait and TTFT objectives (gateway/fair_queue.py, gateway/slo.py, docs/fairness.md)."""
    slo = "gateway_slo_requests_total"
    return [
        ts("Share of served tokens by tenant",
           (f'({rate(PROMPT, "tenant")} + {rate(COMPL, "tenant")})\n'
            f"/ scalar(sum({PROMPT}{{{MDT_F}}}) + sum({COMPL}{{{MDT_F}}}))", "{{tenant}}"), unit="percentunit",
           desc="Prompt + completion tokens vLLM served, per tenant: what the fair queue shares by weight"),
        ts("Queue wait p95 by tenant",
           (f"histogram_quantile(0.95, sum by (tenant, le) (rate(gateway_tenant_queue_seconds_bucket{{{D}, {T}}}"
            "[$__rate_interval])))", "{{tenant}}"), unit="s",
           desc="Time waiting for a deployment slot (the fair queue when saturated)"),
        ts("Requests waiting in fair queues", (f"sum by (deployment) (gateway_fair_queue_waiting{{{D}}})",
                                               "{{deployment}}")),
        ts("TTFT objective: attainment by class",
           (f'sum by (priority_class) (rate({slo}{{result="met"}}[$__rate_interval]))\n'
            f'/ sum by (priority_class) (rate({slo}{{result=~"met|missed"}}[$__rate_interval]))',
            "{{priority_class}}"), unit="percentunit",
           desc="Share of admitted streamed requests of a class with an objective whose first token came in time"),
        ts("TTFT objective: requests/s by class and result",
           (f"sum by (priority_class, result) (rate({slo}[$__rate_interval]))", "{{priority_class}} {{result}}"),
           unit="reqps", desc="met / missed (admitted), refused (429 with Retry-After), fallback (moved to a "
                              "route's next candidate); refusals also count in gateway_ratelimit_refusals{limit=slo}"),
        ts("TTFT predictor: mean absolute error by class",
           ("sum by (priority_class) (rate(gateway_slo_prediction_error_seconds_sum[$__rate_interval]))\n"
            "/ sum by (priority_class) (rate(gateway_slo_prediction_error_seconds_count[$__rate_interval]))",
            "{{priority_class}}"), unit="s"),
    ]


# ------------------------------------------------------------------------------------ dashboard JSON

def _var(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "definition": query,
            "query": {"query": query, "refId": f"var-{name}"}, "refresh": 2, "includeAll": True, "multi": True,
            "allValue": ".+", "sort": 1, "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


VARIABLES = [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "hide": 0,
     "current": {"selected": False, "text": "Prometheus", "value": "prometheus"}},
    _var("model", "Model", "label_values(gateway_model_info, model)"),
    _var("deployment", "Deployment", "label_values(gateway_upstream_healthy, deployment)"),
    _var("tenant", "Tenant", "label_values(gateway_requests_total, tenant)"),
]


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + row_h
        field_cfg: dict[str, Any] = {"defaults": {"unit": p.unit, "min": 0}, "overrides": []}
        if "mappings" in p.extra:
            field_cfg["defaults"]["mappings"] = p.extra["mappings"]
        panel = {"id": i, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
                 "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y}, "fieldConfig": field_cfg,
                 "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": e, "legendFormat": leg, "range": True}
                             for j, (e, leg) in enumerate(p.targets)]}
        panel["options"] = p.extra.get("options", {"legend": {"displayMode": "list", "placement": "bottom"},
                                                   "tooltip": {"mode": "multi"}})
        out.append(panel)
        x, row_h = x + p.width, max(row_h if x else 0, p.height)
    return {"uid": uid, "title": title, "description": description, "tags": ["vllm-gateway"],
            "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": False, "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
            "templating": {"list": VARIABLES}, "annotations": {"list": []}, "links": [], "panels": out}


DASHBOARD_SPECS = {
    "gateway-overview.json": ("vllm-gateway-overview", "vLLM gateway: overview",
                              "Traffic, latency, tokens, cost, cache, fallbacks, breakers, limits", gateway_overview),
    "vllm-engines.json": ("vllm-gateway-engines", "vLLM gateway: engines",
                          "Each vLLM deployment's own metrics next to the gateway's view of it", vllm_engines),
    "cost-tenants.json": ("vllm-gateway-cost", "vLLM gateway: cost and tenants",
                          "Spend by tenant and model, cost per token, model tiers, savings, fair share and "
                          "TTFT objectives", cost_tenants),
}


class _RulesDumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, as a person would write them."""


_RulesDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def outputs() -> dict[Path, str]:
    files = {DASHBOARDS / name: json.dumps(dashboard(uid, title, desc, fn()), indent=2) + "\n"
             for name, (uid, title, desc, fn) in DASHBOARD_SPECS.items()}
    header = ("# Recording rules the dashboards read. GENERATED by `python -m dashboards.build`: edit\n"
              "# dashboards/build.py, not this file.\n")
    files[RULES_FILE] = header + yaml.dump(recording_rules(), Dumper=_RulesDumper, sort_keys=False, width=200)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run python -m dashboards.build): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
