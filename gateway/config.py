"""Configuration: strict YAML schema, ${ENV} substitution, and compilation into a frozen runtime view."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.money import exact_per_token, per_token_pico

log = logging.getLogger("gateway.config")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config that cannot be served; the message names the file, the key path and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    connect: float = Field(5.0, gt=0, description="seconds to open a TCP connection to vLLM")
    first_token: float = Field(60.0, gt=0, description="seconds from sending until response headers / first chunk")
    total: float = Field(600.0, gt=0, description="seconds for the whole upstream request")


class FairQueueSpec(_Strict):
    """The deployment's gateway-side fair queue (gateway/fair_queue.py, docs/fairness.md)."""

    max_waiting: float | None = Field(None, ge=0, description="also saturated while vllm:num_requests_waiting "
                                      "is above this")
    max_kv_cache: float | None = Field(None, gt=0, le=1, description="also saturated while "
                                       "vllm:kv_cache_usage_perc is above this")
    window_s: float = Field(60.0, gt=0, description="decay time of the served tokens that decide the share")
    priority_slots: int = Field(0, ge=0, description="slots beyond the bound, only for a request of a better "
                                "priority than one in flight (an engine with priority scheduling runs it first)")


class DeploymentSpec(_Strict):
    name: str | None = None
    url: str
    model: str = Field(description="model name on the vLLM server (a base model or a LoRA adapter)")
    weight: float = Field(1.0, gt=0)
    max_concurrency: int = Field(256, ge=1, description="requests this gateway worker sends at once")
    timeouts: Timeouts = Timeouts()
    api_key: str | None = Field(None, description="bearer token vLLM expects (--api-key), if any")
    priority_scheduling: bool = Field(False, description="vLLM runs with --scheduling-policy priority: "
                                      "requests carry their class's `priority`; off: the field is never sent")
    fair_queue: FairQueueSpec | None = Field(None, description="when saturated, requests wait per tenant and "
                                             "are released by weighted fair share of served tokens")
    adapter_slots: int = Field(0, ge=0, le=1024, description="catalogue adapters (adapters:) the gateway may "
                               "load onto this vLLM at run time; 0: none (docs/routing.md, LoRA adapters)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class Prices(_Strict):
    prompt_per_1m: float = Field(0.0, ge=0)
    completion_per_1m: float = Field(0.0, ge=0)
    cached_prompt_per_1m: float | None = Field(None, ge=0, description="defaults to prompt_per_1m")

    @field_validator("prompt_per_1m", "completion_per_1m", "cached_prompt_per_1m")
    @classmethod
    def _exact(cls, v: float | None) -> float | None:
        # Money is kept in integer pico-USD: a price per 1M tokens with more than six decimals has no exact form.
        if v is not None and not exact_per_token(v):
            raise ValueError(f"{v!r} has more than six decimals (money is exact to 1e-12 USD per token)")
        return v


class CostBasis(_Strict):
    gpu_usd_per_hour: float = Field(gt=0)
    gpu_count: int = Field(1, ge=1)


# ---- Redis-backed features: response cache, rate limits and budgets, usage ledger (docs/redis.md)

CacheMode = Literal["off", "deterministic", "all"]


class CacheRuleSpec(_Strict):
    mode: CacheMode | None = Field(None, description="off, deterministic (temperature 0 or a seed), all")
    ttl_s: float | None = Field(None, gt=0)


class TenantCacheSpec(CacheRuleSpec):
    scope: str | None = Field(None, min_length=1, description="tenants naming the same scope share answers")


class LimitsSpec(_Strict):
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens per minute (prompt + completion)")
    concurrency: int | None = Field(None, ge=1, description="requests in flight")
    budget_day_usd: float | None = Field(None, gt=0, description="spend per UTC day")
    budget_month_usd: float | None = Field(None, gt=0, description="spend per UTC calendar month")


class TenantSpec(_Strict):
    limits: LimitsSpec = LimitsSpec()
    cache: TenantCacheSpec = TenantCacheSpec()
    priority_class: str | None = Field(None, description="one of priority_classes; default: default_priority_class")
    weight: float = Field(1.0, gt=0, le=1000, description="share of a saturated deployment's tokens, relative")


class PriorityClassSpec(_Strict):
    """A scheduling class (docs/fairness.md): vLLM's priority (lower runs first) and an optional TTFT objective."""

    priority: int = Field(ge=-1_000_000, le=1_000_000, description="vLLM's `priority`: lower is served first")
    ttft_slo_ms: float | None = Field(None, gt=0, description="time-to-first-token objective; a request "
                                      "predicted to miss it is refused at once (429) or sent to a fallback")
    on_slo_miss: Literal["reject", "fallback"] = Field(
        "reject", description="fallback: move to the route's next candidate predicted to meet the objective "
                              "(refused when none is)")


DEFAULT_CLASSES = {"interactive": PriorityClassSpec(priority=0), "standard": PriorityClassSpec(priority=10),
                   "batch": PriorityClassSpec(priority=20)}


class CacheSpec(_Strict):
    mode: CacheMode = "deterministic"
    ttl_s: float = Field(3600.0, gt=0)
    coalesce: bool = Field(True, description="identical concurrent misses wait for the first one's answer")
    coalesce_wait_s: float = Field(30.0, gt=0, description="longest a coalesced request waits for the leader")
    max_entry_bytes: int = Field(1024 * 1024, ge=1024, description="larger answers are not stored")
    max_entries: int = Field(10000, ge=1, description="in-process backend only (LRU)")
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024,
                           description="in-process backend only: the LRU's bound in bytes (keys + values)")


class LimitsDefaultsSpec(_Strict):
    default_max_tokens: int = Field(256, ge=1, description="tokens reserved when a request names no max_tokens")
    lease_s: float = Field(900.0, gt=0, description="a concurrency slot not released (crash) expires after this")
    max_output_tokens: int | None = Field(None, ge=1, description="cap on any request's max_tokens (all models)")
    media_part_tokens: int = Field(4096, ge=1, description="tokens reserved per image/audio/video part")
    settle_retry_max: int = Field(100_000, ge=1, description="limit settles kept for retry while Redis is away")


class RedisFailureSpec(_Strict):
    cache: Literal["open", "closed"] = "open"
    limits: Literal["open", "closed"] = "open"


class RedisSpec(_Strict):
    url: str | None = Field(None, description="redis://[user:pw@]host:port/db, rediss:// (TLS), unix://, or "
                            "redis+sentinel://host:port,host:port/MASTER[/db], redis+cluster://seed:port,seed:port "
                            "(docs/redis.md); unset or empty: "
                            "in-process backend")
    key_prefix: str = "gw:"
    timeout_s: float = Field(0.25, gt=0, description="socket timeout of each Redis command")
    down_for_s: float = Field(1.0, ge=0, description="after an error, skip Redis this long (the ledger probes)")
    on_failure: RedisFailureSpec = RedisFailureSpec()
    ledger_stream: str = "ledger"
    ledger_maxlen: int | None = Field(None, ge=1000, description="approximate trim; unset: keep everything")
    ledger_buffer: int = Field(10000, ge=1, description="records kept in memory while the ledger is away")
    ledger_flush_interval_s: float = Field(0.2, gt=0)
    ledger_before_response: bool = Field(True, description="a response's last bytes wait until its ledger record "
                                         "is in Redis (gateway/ledger_gate.py); off: up to one flush interval "
                                         "of finished requests is lost if a replica is killed")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        from gateway.redis_client import check_url

        return check_url(v) if v else v


class LedgerSpec(_Strict):
    """The ledger without Redis (docs/redis.md, "The embedded backend"), and byte bounds for every backend."""

    path: str | None = Field(None, description="SQLite file; default $GATEWAY_STATE_DIR/ledger.sqlite3 "
                                               "(~/.cache/vllm-gateway); 'memory': this process only")
    max_rows: int = Field(1_000_000, ge=1000, description="SQLite: the oldest records beyond this are deleted")
    max_age_days: float = Field(400.0, gt=0, description="SQLite: records older than this are deleted")
    usage_days: int = Field(400, ge=1, description="how long per-hour usage aggregates are kept (every backend)")
    memory_bytes: int = Field(16 * 1024 * 1024, ge=65536, description="path 'memory': bytes of records kept")
    buffer_bytes: int = Field(8 * 1024 * 1024, ge=65536,
                              description="records waiting to be written, in bytes (beyond: dropped, counted)")
    spool_path: str | None = Field(None, description="with redis.url: the local file where records and budget "
                                   "charges wait while Redis is away (gateway/spool.py); default "
                                   "$GATEWAY_STATE_DIR/spool.sqlite3, one per replica; 'off': memory only")
    spool_max_bytes: int = Field(1024 * 1024 * 1024, ge=65536,
                                 description="the spool's bound (beyond: kept in memory, then dropped and counted)")


class PrefixRoutingSpec(_Strict):
    """Tuning of `balance: prefix` (docs/routing.md, "Balance policies")."""

    block_chars: int = Field(256, ge=16, le=65536, description="prompt characters per hashed block (~64 tokens)")
    max_blocks: int = Field(64, ge=1, le=4096, description="leading blocks of a prompt that are hashed")
    load_factor: float = Field(1.25, ge=1.0, le=10.0,
                               description="a deployment takes affinity traffic while its in-flight requests "
                                           "stay within load_factor x its weighted share")
    rate_factor: float = Field(1.2, ge=1.0, le=10.0,
                               description="... and while its recent requests per weight (decayed over a minute) "
                                           "stay within rate_factor x the least busy one's (or 4 more)")
    max_kv_cache: float = Field(0.9, gt=0, le=1, description="no affinity traffic to a vLLM whose "
                                                             "kv_cache_usage_perc is above this")
    index_blocks: int = Field(16384, ge=64, description="blocks remembered per deployment (LRU); also capped "
                                                        "by the KV cache size vLLM reports")


BalancePolicy = Literal["least_outstanding", "prefix"]


class ModelSpec(_Strict):
    deployments: list[DeploymentSpec] = Field(min_length=1)
    balance: BalancePolicy = Field("least_outstanding", description="how one of the deployments is chosen")
    prefix_routing: PrefixRoutingSpec | None = None
    prices: Prices | None = None
    cost_basis: CostBasis | None = None
    cache: CacheRuleSpec | None = None
    owned_by: str = "vllm"
    tier: Literal["large", "small", "adapter"] = Field("large", description="for routing reports and dashboards")
    context_window: int | None = Field(None, ge=1, description="tokens; default: vLLM's max_model_len")
    default_max_tokens: int | None = Field(None, ge=1, description="max_tokens set when a request names none")
    max_output_tokens: int | None = Field(None, ge=1, description="cap on a request's max_tokens for this model")
    tokenizer: str | None = Field(None, description="folder vLLM serves this model from (tokenizer.json and its "
                                  "chat template): prompts are counted exactly; unset: bounded by their bytes")

    @model_validator(mode="after")
    def _one_cost_source(self) -> ModelSpec:
        if self.prices is not None and self.cost_basis is not None:
            raise ValueError("give either prices or cost_basis, not both")
        if self.prefix_routing is not None and self.balance != "prefix":
            raise ValueError("prefix_routing applies only with balance: prefix")
        return self


class AdapterSpec(_Strict):
    """One LoRA adapter of the catalogue: loaded at run time onto deployments of its base model."""

    base: str = Field(description="the model (in models:) whose deployments with adapter_slots can load it")
    path: str = Field(min_length=1, description="where the engine loads it from (vLLM's lora_path: a folder "
                      "on the engine's machine, or what its LoRA resolver accepts)")
    prices: Prices | None = Field(None, description="default: the base model's")
    cost_basis: CostBasis | None = None
    cache: CacheRuleSpec | None = None
    owned_by: str = "vllm"
    tier: Literal["large", "small", "adapter"] = "adapter"

    @model_validator(mode="after")
    def _one_cost_source(self) -> AdapterSpec:
        if self.prices is not None and self.cost_basis is not None:
            raise ValueError("give either prices or cost_basis, not both")
        return self


class AdapterPlacementSpec(_Strict):
    """How catalogue adapters are placed on engines (gateway/routing/adapters.py, docs/routing.md)."""

    policy: Literal["lru", "random"] = Field("lru", description="lru: load where a slot is free, else evict the "
                                             "least recently used idle adapter; random: a random engine and "
                                             "victim (the benchmark's baseline)")
    load_timeout_s: float = Field(120.0, gt=0, description="a load slower than this falls back (counted)")
    slot_wait_s: float = Field(30.0, gt=0, description="how long a request waits for a slot when every adapter "
                               "on its engines has requests in flight")
    replicate_in_flight: int | None = Field(8, ge=1, description="a hot adapter is loaded onto one more engine "
                                            "(one with a free slot) when each holder has this many requests in "
                                            "flight; null: one engine per adapter")
    idle_unload_s: float | None = Field(None, gt=0, description="unload adapters unused this long; null: only "
                                        "when the slot is needed")
    sync_interval_s: float = Field(30.0, gt=0, description="re-read each engine's /v1/models this often (and "
                                   "whenever it comes back healthy)")
    cold_start_billing: Literal["request", "operator"] = Field(
        "operator", description="the engine time a load takes: billed to the request that caused it, or the "
                                "operator's cost (adapter_load_cost_*, gateway_adapter_load_cost_usd)")
    load_usd_per_hour: float | None = Field(None, ge=0, description="what an engine's time costs while it loads; "
                                            "default: the adapter's cost_basis, else 0")


class ApiKeySpec(_Strict):
    tenant: str = Field(min_length=1)
    key_sha256: str | None = Field(None, description="hex SHA-256 of the key")
    key: str | None = Field(None, description="the key itself, normally as ${ENV_NAME}")
    admin: bool = False
    limits: LimitsSpec | None = None
    priority_class: str | None = Field(None, description="this key's class (overrides its tenant's)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKeySpec:
        if (self.key_sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of key_sha256 or key")
        if self.key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError("key_sha256 must be 64 lowercase hex digits")
        return self


class AuthSpec(_Strict):
    keys: list[ApiKeySpec] = []


class ServerSpec(_Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait for a deployment slot")
    health_interval: float = Field(5.0, gt=0)
    request_log: str = Field("stderr", description="stderr, stdout, off, or a file path")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send its request body")
    max_connections: int | None = Field(None, ge=1, description="uvicorn limit_concurrency; beyond it: 503")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send its request "
                                  "line and headers (slowloris); then the connection is closed with a 408")
    max_json_depth: int = Field(64, ge=2, le=200, description="deepest nesting of arrays/objects in a body")
    metrics_key: str | None = Field(None, description="bearer token /metrics requires; unset: /metrics is open")
    docs: bool = Field(False, description="serve /docs and /redoc (Swagger UI / ReDoc load from a CDN)")
    openapi: bool = Field(True, description="serve /openapi.json (names the public models; no secrets)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, requests still running after this long "
                                    "are cut (outcome gateway_shutdown, accounted)")
    drain_notice_s: float = Field(0.0, ge=0, le=600, description="on SIGTERM, seconds the replica keeps serving "
                                  "while /readyz answers 503 (so load balancers take it out) before it stops "
                                  "accepting; then shutdown_grace_s for what still runs (gateway/drain.py)")

    @field_validator("request_log", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false


class FailureFallbackSpec(_Strict):
    max_attempts: int = Field(3, ge=1, description="upstream calls per request, all candidates together")
    budget_s: float = Field(30.0, gt=0, description="no new attempt starts after this many seconds")


class OverloadSpec(_Strict):
    max_waiting: float | None = Field(None, ge=0, description="vllm:num_requests_waiting above this is overload")
    max_kv_cache: float | None = Field(None, ge=0, le=1, description="vllm:kv_cache_usage_perc above this")
    max_in_flight: int | None = Field(None, ge=1, description="this gateway's requests in flight on a deployment")


class DeadlineSpec(_Strict):
    default_ms: float | None = Field(None, gt=0, description="deadline when the request names none")
    on_miss: Literal["best_effort", "reject"] = "best_effort"


class BudgetPressureSpec(_Strict):
    threshold: float = Field(0.8, gt=0, le=1, description="share of a budget spent that triggers downgrades")


class TaskAutoSpec(_Strict):
    """`task_auto`: the task of an undeclared request decided from its text (docs/routing.md, "Automatic task
    routing"): its last user text is embedded by `embedding` and scored against each task's labelled examples."""

    embedding: str = Field(description="a model in models that serves /v1/embeddings (e.g. all-MiniLM)")
    examples: dict[str, str] = Field(min_length=1, description="task -> JSON-lines file of labelled requests, "
                                     '{"text": ..., "match": true|false} (false: must stay on the default model); a '
                                     "relative path is taken from the config file's folder, else the working directory")
    threshold: float = Field(0.8, ge=0, le=1, description="a request goes to its task's model only when the "
                             "classifier's probability is at least this")
    deadline_ms: float = Field(50.0, gt=0, description="the embedding call's deadline; later: the default route")
    max_chars: int = Field(1000, ge=16, le=100_000, description="leading characters of the text embedded")
    l2: float = Field(0.01, gt=0, description="the logistic regression's L2 penalty (larger: smoother)")


class RouteSpec(_Strict):
    candidates: list[str] = Field(min_length=1, description="model names, most capable first")
    failure_fallback: FailureFallbackSpec = FailureFallbackSpec()
    overload: OverloadSpec | None = None
    deadline: DeadlineSpec | None = None
    budget_pressure: BudgetPressureSpec | None = None
    context_length: bool = Field(True, description="move prompts too long for a candidate to one that fits")
    tasks: dict[str, str] = Field(default_factory=dict, description="task name -> candidate model")
    task_auto: TaskAutoSpec | None = Field(None, description="decide undeclared requests' task from their text")


class CircuitBreakerSpec(_Strict):
    failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    window_s: float = Field(30.0, gt=0)
    failure_ratio: float = Field(0.5, gt=0, le=1, description="or this share of failures in the window")
    min_requests: int = Field(10, ge=1, description="requests in the window before the ratio counts")
    cooldown_s: float = Field(10.0, gt=0, description="open -> half-open after this long")
    half_open_probes: int = Field(1, ge=1, description="requests let through while half-open")


class TracingSpec(_Strict):
    """OpenTelemetry traces (docs/tracing.md): off unless otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) is set."""

    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP (protobuf) collector URL, e.g. "
                                      "http://collector:4318 (/v1/traces is added to a bare base URL)")
    sample_ratio: float | None = Field(None, ge=0, le=1, description="share of new traces kept (a client's "
                                       "sampled flag is followed); unset: OTEL_TRACES_SAMPLER, default all")
    service_name: str | None = Field(None, description="service.name; unset: OTEL_SERVICE_NAME or vllm-gateway")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with each export (e.g. an API key)")
    export_timeout_s: float = Field(10.0, gt=0)
    max_queue_size: int = Field(2048, ge=1, description="spans waiting for export; beyond: dropped, never waited on")
    schedule_delay_ms: int = Field(1000, ge=1, description="most time a span waits before its batch is sent")

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL (OTLP/HTTP), got {v!r}")
        return v or None


class GatewaySpec(_Strict):
    server: ServerSpec = ServerSpec()
    auth: AuthSpec = AuthSpec()
    models: dict[str, ModelSpec] = Field(min_length=1)
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict, description="LoRA adapters loaded on demand")
    adapter_placement: AdapterPlacementSpec = AdapterPlacementSpec()
    routes: dict[str, RouteSpec] = Field(default_factory=dict)
    circuit_breaker: CircuitBreakerSpec = CircuitBreakerSpec()
    metrics_scrape_interval: float = Field(5.0, gt=0, description="seconds between scrapes of vLLM /metrics")
    redis: RedisSpec = RedisSpec()
    cache: CacheSpec = CacheSpec()
    ledger: LedgerSpec = LedgerSpec()
    limits: LimitsDefaultsSpec = LimitsDefaultsSpec()
    tenants: dict[str, TenantSpec] = Field(default_factory=dict, description="per-tenant limits and cache")
    tracing: TracingSpec = TracingSpec()
    priority_classes: dict[str, PriorityClassSpec] = Field(default_factory=lambda: dict(DEFAULT_CLASSES))
    default_priority_class: str = "standard"

    @model_validator(mode="after")
    def _classes_exist(self) -> GatewaySpec:
        named: list[tuple[str, str | None]] = [("default_priority_class", self.default_priority_class)]
        named += [(f"tenants.{t}.priority_class", s.priority_class) for t, s in self.tenants.items()]
        named += [(f"auth.keys.{i}.priority_class", k.priority_class) for i, k in enumerate(self.auth.keys)]
        for where, c in named:
            if c is not None and c not in self.priority_classes:
                raise ValueError(f"{where}: {c!r} is not one of priority_classes ({', '.join(self.priority_classes)})")
        return self

    @model_validator(mode="after")
    def _routes_name_models(self) -> GatewaySpec:
        for name, a in self.adapters.items():
            if name in self.models:
                raise ValueError(f"adapters.{name}: an adapter cannot have the name of a model")
            base = self.models.get(a.base)
            if base is None:
                raise ValueError(f"adapters.{name}.base: {a.base!r} is not a model in models")
            if not any(d.adapter_slots for d in base.deployments):
                raise ValueError(f"adapters.{name}.base: no deployment of {a.base!r} has adapter_slots")
        for name, route in self.routes.items():
            if name in self.models or name in self.adapters:
                raise ValueError(f"routes.{name}: a route cannot have the name of a model or adapter")
            for c in [*route.candidates, *route.tasks.values()]:
                if c not in self.models and c not in self.adapters:
                    raise ValueError(f"routes.{name}: candidate {c!r} is not a model in models")
            for task, c in route.tasks.items():
                if c not in route.candidates:
                    raise ValueError(f"routes.{name}.tasks.{task}: {c!r} must also be one of the candidates")
            if (auto := route.task_auto) is not None:
                if auto.embedding not in self.models:
                    raise ValueError(f"routes.{name}.task_auto.embedding: {auto.embedding!r} is not a model in models")
                for task in auto.examples:
                    if task not in route.tasks:
                        raise ValueError(f"routes.{name}.task_auto.examples.{task}: the task is not in the route's "
                                         "tasks (which model would it go to?)")
        return self


# ---------------------------------------------------------------- compiled, immutable runtime view


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    url: str
    upstream_model: str
    weight: float
    max_concurrency: int
    timeouts: Timeouts
    api_key: str | None
    priority_scheduling: bool = False
    fair_queue: FairQueueSpec | None = None
    adapter_slots: int = 0


@dataclass(frozen=True, slots=True)
class Adapter:
    """A catalogue adapter: vLLM serves it as `name` once loaded from `path` (gateway/routing/adapters.py)."""

    name: str
    path: str
    base: str


@dataclass(frozen=True, slots=True)
class Pricing:
    """Per-token prices (USD floats for estimates, exact pico-USD integers for bills) or a GPU cost per second."""

    prompt: float = 0.0
    completion: float = 0.0
    cached_prompt: float = 0.0
    gpu_usd_per_second: float | None = None
    prompt_pico: int = 0
    completion_pico: int = 0
    cached_prompt_pico: int = 0


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    deployments: tuple[Deployment, ...]
    pricing: Pricing
    owned_by: str
    tier: str = "large"
    context_window: int | None = None
    default_max_tokens: int | None = None  # None: limits.default_max_tokens
    max_output_tokens: int | None = None  # None: limits.max_output_tokens (if any)
    balance: str = "least_outstanding"
    prefix_routing: PrefixRoutingSpec | None = None  # set when balance is "prefix"
    tokenizer: str | None = None  # folder with tokenizer.json + chat template (gateway/prompt_tokens.py)
    adapter: Adapter | None = None  # a catalogue adapter: its deployments are its base's with adapter_slots

    def unit_price(self) -> float:
        """A comparable price per token (prompt + completion), for 'cheaper candidate' decisions."""
        p = self.pricing
        return p.prompt + p.completion if p.gpu_usd_per_second is None else p.gpu_usd_per_second


@dataclass(frozen=True, slots=True)
class TaskAuto:
    """A route's automatic task routing, compiled: the embedding model and each task's labelled examples."""

    embedding: Model
    examples: dict[str, tuple[tuple[str, bool], ...]]  # task -> (text, is the task)
    threshold: float
    deadline_s: float
    max_chars: int
    l2: float


@dataclass(frozen=True, slots=True)
class Route:
    """A public name whose requests go to an ordered list of candidate models, moved by rules."""

    name: str
    candidates: tuple[Model, ...]
    spec: RouteSpec
    tasks: dict[str, Model]
    auto: TaskAuto | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """One scope's limits (an API key or a tenant); 0 means no such limit."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    budget_day: float = 0.0
    budget_month: float = 0.0


@dataclass(frozen=True, slots=True)
class CachePolicy:
    mode: str  # off | deterministic | all
    ttl_s: float
    scope: str  # whose answers may be shared: the tenant's name unless config declares a shared scope


@dataclass(frozen=True)
class Features:
    """The Redis-backed features, compiled into lookup tables (see gateway/store.py, cache.py, limits.py)."""

    redis: RedisSpec = field(default_factory=RedisSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    limits: LimitsDefaultsSpec = field(default_factory=LimitsDefaultsSpec)
    cache_policies: dict[tuple[str, str], CachePolicy] = field(default_factory=dict)  # (tenant, model)
    tenant_limits: dict[str, Limits] = field(default_factory=dict)
    key_limits: dict[str, Limits] = field(default_factory=dict)  # by key fingerprint (12 hex digits)
    ledger: LedgerSpec = field(default_factory=LedgerSpec)
    prompt_scopes: dict[str, str] = field(default_factory=dict)  # tenant -> whose prompts it may share

    def cache_policy(self, tenant: str, model: str) -> CachePolicy:
        p = self.cache_policies.get((tenant, model))
        return p if p is not None else CachePolicy("off", 0.0, tenant)

    def prompt_scope(self, tenant: str) -> str:
        """Tenants in one scope may share cached prompts (vLLM's prefix cache, the prefix index): their own
        name, unless tenants.X.cache.scope declares a shared one (the response cache's scope too)."""
        return self.prompt_scopes.get(tenant) or f"tenant:{tenant}"

    def cache_salt(self, tenant: str) -> str:
        """vLLM's `cache_salt` for the tenant's requests: its prefix cache shares KV blocks only between
        requests with the same salt, so cached_tokens and time to first token reveal nothing across scopes.
        Clients never choose it (the gateway overwrites theirs), so it needs no secret."""
        return hashlib.sha256(self.prompt_scope(tenant).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    priority: int
    ttft_slo_s: float | None = None
    on_slo_miss: str = "reject"


@dataclass(frozen=True)
class Scheduling:
    """Priority classes and fair-share weights, resolved once (gateway/priority.py reads them per request)."""

    classes: dict[str, PriorityClass] = field(
        default_factory=lambda: {n: PriorityClass(n, c.priority) for n, c in DEFAULT_CLASSES.items()})
    default_class: str = "standard"
    tenant_class: dict[str, str] = field(default_factory=dict)
    key_class: dict[str, str] = field(default_factory=dict)  # by key fingerprint (12 hex digits)
    tenant_weight: dict[str, float] = field(default_factory=dict)

    def class_of(self, tenant: str, key_hash: str | None) -> PriorityClass:
        name = (self.key_class.get(key_hash) if key_hash else None) or self.tenant_class.get(tenant) \
            or self.default_class
        return self.classes[name]

    def weight(self, tenant: str) -> float:
        return self.tenant_weight.get(tenant, 1.0)


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    server: ServerSpec
    models: dict[str, Model]
    keys_by_sha256: dict[str, Tenant]
    auth_enabled: bool
    routes: dict[str, Route] = field(default_factory=dict)
    circuit_breaker: CircuitBreakerSpec = field(default_factory=CircuitBreakerSpec)
    metrics_scrape_interval: float = 5.0
    features: Features = field(default_factory=lambda: Features())  # cache, limits, ledger (Redis)
    tracing: TracingSpec = field(default_factory=TracingSpec)
    scheduling: Scheduling = field(default_factory=Scheduling)  # priority classes, fair-share weights
    adapter_placement: AdapterPlacementSpec = field(default_factory=AdapterPlacementSpec)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def substitute_env(value: Any, env: dict[str, str] | os._Environ[str]) -> Any:
    """Replace ${NAME} and ${NAME:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = env.get(name)
            if got is None or got == "":
                if default is None:
                    raise KeyError(name)
                return default
            return got

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env) for v in value]
    return value


def _substitute_with_paths(tree: Any, env: dict[str, str] | os._Environ[str], path: str = "") -> Any:
    """Like substitute_env, but an unset variable without default names its key path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            key_path = f"{path}.{k}" if path else str(k)
            key = _substitute_with_paths(k, env, key_path) if isinstance(k, str) else k
            out[key] = _substitute_with_paths(v, env, key_path)
        return out
    if isinstance(tree, list):
        return [_substitute_with_paths(v, env, f"{path}.{i}") for i, v in enumerate(tree)]
    try:
        return substitute_env(tree, env)
    except KeyError as e:
        raise ConfigError(f"{path}: environment variable {e.args[0]} is not set and has no default") from None


def _drop_unset_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """An API key given as ${VAR} with VAR unset resolves to "" and is dropped (auth may end up off)."""
    auth = raw.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("keys"), list):
        kept = [k for k in auth["keys"] if not (isinstance(k, dict) and k.get("key") == "")]
        if len(kept) != len(auth["keys"]):
            log.warning("api key entries with an empty key were dropped (their env variable is unset)")
        auth = {**auth, "keys": kept}
        raw = {**raw, "auth": auth}
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid gateway config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, source: str, env: dict[str, str] | os._Environ[str] | None = None) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid gateway config {source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid gateway config {source}: top level must be a mapping")
    try:
        raw = _substitute_with_paths(raw, os.environ if env is None else env)
    except ConfigError as e:
        raise ConfigError(f"invalid gateway config {source}: {e}") from None
    raw = _drop_unset_keys(raw)
    try:
        spec = GatewaySpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None
    return compile_config(spec, source)


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read gateway config {p}: {e.strerror}") from None
    return parse_config(text, str(p))


def _tokenizer_folder(path: str | None, where: str) -> str | None:
    """The folder holding tokenizer.json (a path to the file itself is accepted); a missing one stops start-up."""
    if not path:
        return None
    folder = Path(path).expanduser()
    if folder.name == "tokenizer.json":
        folder = folder.parent
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{where}: no tokenizer.json in {str(folder)!r}")
    return str(folder)


def _task_examples(path: str, source: str, where: str) -> tuple[tuple[str, bool], ...]:
    """A task's labelled examples: JSON lines {"text": str, "match": bool}; both kinds are required."""
    p = Path(path).expanduser()
    if not p.is_absolute() and Path(source).is_file() and (Path(source).parent / p).is_file():
        p = Path(source).parent / p  # next to the config file; else from the working directory
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{source}: {where}: cannot read {str(p)!r}: {e.strerror}") from None
    out: list[tuple[str, bool]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: {where}: {p}:{i}: not JSON: {e.msg}") from None
        if not (isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip()
                and isinstance(row.get("match"), bool)):
            raise ConfigError(f'{source}: {where}: {p}:{i}: expected {{"text": "...", "match": true|false}}')
        out.append((row["text"], row["match"]))
    if not any(m for _, m in out) or all(m for _, m in out):
        raise ConfigError(f"{source}: {where}: {p} needs examples of the task (match: true) and of other requests "
                          "(match: false)")
    return tuple(out)


def _compile_task_auto(name: str, spec: TaskAutoSpec | None, models: dict[str, Model], source: str) -> TaskAuto | None:
    if spec is None:
        return None
    examples = {task: _task_examples(path, source, f"routes.{name}.task_auto.examples.{task}")
                for task, path in spec.examples.items()}
    return TaskAuto(models[spec.embedding], examples, spec.threshold, spec.deadline_ms / 1e3, spec.max_chars, spec.l2)


def compile_config(spec: GatewaySpec, source: str) -> GatewayConfig:
    models: dict[str, Model] = {}
    seen_deployments: set[str] = set()
    for name, m in spec.models.items():
        deps = []
        for i, d in enumerate(m.deployments):
            dep_name = d.name or f"{name}-{i}"
            if dep_name in seen_deployments:
                raise ConfigError(f"invalid gateway config {source}:\n  models.{name}.deployments.{i}.name: "
                                  f"deployment name {dep_name!r} is used twice")
            seen_deployments.add(dep_name)
            deps.append(Deployment(dep_name, d.url, d.model, d.weight, d.max_concurrency, d.timeouts, d.api_key,
                                   d.priority_scheduling, d.fair_queue, d.adapter_slots))
        pricing = _pricing(m.prices, m.cost_basis)
        prefix = (m.prefix_routing or PrefixRoutingSpec()) if m.balance == "prefix" else None
        tokenizer = _tokenizer_folder(m.tokenizer, f"{source}: models.{name}.tokenizer")
        models[name] = Model(name, tuple(deps), pricing, m.owned_by, m.tier, m.context_window,
                             m.default_max_tokens, m.max_output_tokens, m.balance, prefix, tokenizer)
    for name, a in spec.adapters.items():
        # An adapter is a model whose deployments are its base's engines that may load adapters (the same
        # Deployment objects: one engine, one concurrency limit, one breaker, whichever model a request names).
        base = models[a.base]
        own = a.prices is not None or a.cost_basis is not None
        models[name] = Model(name, tuple(d for d in base.deployments if d.adapter_slots),
                             _pricing(a.prices, a.cost_basis) if own else base.pricing, a.owned_by, a.tier,
                             base.context_window, base.default_max_tokens, base.max_output_tokens,
                             tokenizer=base.tokenizer, adapter=Adapter(name, a.path, a.base))
    routes = {name: Route(name, tuple(models[c] for c in r.candidates), r,
                          {task: models[c] for task, c in r.tasks.items()},
                          _compile_task_auto(name, r.task_auto, models, source))
              for name, r in spec.routes.items()}

    keys: dict[str, Tenant] = {}
    for k in spec.auth.keys:
        digest = k.key_sha256 or hash_key(k.key or "")
        keys[digest] = Tenant(k.tenant, k.admin)
    if not keys:
        log.warning("no API keys configured: authentication is OFF, every caller is tenant 'anonymous'")
    tenants = tuple(sorted({t.name for t in keys.values()} | ({"anonymous"} if not keys else set())))
    return GatewayConfig(source, spec.server, models, keys, bool(keys), routes, spec.circuit_breaker,
                         spec.metrics_scrape_interval, compile_features(spec, models, keys, tenants), spec.tracing,
                         compile_scheduling(spec), spec.adapter_placement)


def compile_scheduling(spec: GatewaySpec) -> Scheduling:
    classes = {n: PriorityClass(n, c.priority, None if c.ttft_slo_ms is None else c.ttft_slo_ms / 1e3, c.on_slo_miss)
               for n, c in spec.priority_classes.items()}
    key_class = {(k.key_sha256 or hash_key(k.key or ""))[:12]: k.priority_class
                 for k in spec.auth.keys if k.priority_class is not None}
    return Scheduling(classes, spec.default_priority_class,
                      {t: s.priority_class for t, s in spec.tenants.items() if s.priority_class is not None},
                      key_class, {t: s.weight for t, s in spec.tenants.items()})


def _pricing(prices: Prices | None, cost_basis: CostBasis | None) -> Pricing:
    if prices is not None:
        p = prices
        cached = p.prompt_per_1m if p.cached_prompt_per_1m is None else p.cached_prompt_per_1m
        return Pricing(p.prompt_per_1m / 1e6, p.completion_per_1m / 1e6, cached / 1e6, None,
                       per_token_pico(p.prompt_per_1m), per_token_pico(p.completion_per_1m), per_token_pico(cached))
    if cost_basis is not None:
        return Pricing(gpu_usd_per_second=cost_basis.gpu_usd_per_hour * cost_basis.gpu_count / 3600.0)
    return Pricing()


def _limits(spec: LimitsSpec | None) -> Limits | None:
    if spec is None:
        return None
    lim = Limits(spec.rpm or 0, spec.tpm or 0, spec.concurrency or 0, spec.budget_day_usd or 0.0,
                 spec.budget_month_usd or 0.0)
    return lim if lim != Limits() else None


def compile_features(spec: GatewaySpec, models: dict[str, Model], keys: dict[str, Tenant],
                     tenants: tuple[str, ...]) -> Features:
    """Cache policy per (tenant, model) and limits per key and tenant, resolved once at start-up."""
    tenant_limits = {name: lim for name, t in spec.tenants.items() if (lim := _limits(t.limits)) is not None}
    key_limits: dict[str, Limits] = {}
    for k in spec.auth.keys:
        lim = _limits(k.limits)
        if lim is not None:
            key_limits[(k.key_sha256 or hash_key(k.key or ""))[:12]] = lim
    unknown = sorted(set(spec.tenants) - set(tenants))
    if unknown:
        log.warning("tenants %s have settings but no API key", ", ".join(unknown))
    policies: dict[tuple[str, str], CachePolicy] = {}
    scopes: dict[str, str] = {}
    for tenant in sorted(set(tenants) | set(spec.tenants) | {"anonymous"}):
        t = spec.tenants.get(tenant, TenantSpec()).cache
        scopes[tenant] = f"shared:{t.scope}" if t.scope else f"tenant:{tenant}"
        rules = {**{n: m.cache for n, m in spec.models.items()}, **{n: a.cache for n, a in spec.adapters.items()}}
        for name, model_rule in rules.items():
            rule = model_rule or CacheRuleSpec()
            # the tenant's rule wins over the model's, which wins over the global default
            mode = t.mode or rule.mode or spec.cache.mode
            ttl = t.ttl_s or rule.ttl_s or spec.cache.ttl_s
            policies[(tenant, name)] = CachePolicy(mode, ttl, f"shared:{t.scope}" if t.scope else f"tenant:{tenant}")
    return Features(spec.redis, spec.cache, spec.limits, policies, tenant_limits, key_limits, spec.ledger, scopes)
