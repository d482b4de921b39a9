"""The one record every request builds; headers, log line, metrics and ledger are all written from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Attempt:
    deployment: str
    model: str
    outcome: str  # "ok", or why it failed: connect_error, timeout, upstream_5xx, ...
    seconds: float


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)  # monotonic origin of every duration
    wall_time: float = field(default_factory=time.time)
    tenant: str = "unauthenticated"
    api_key_hash: str | None = None  # first 12 hex digits of the key's SHA-256, never the key
    requested_model: str | None = None
    served_model: str | None = None  # public model name that answered
    upstream_model: str | None = None  # the name vLLM knows (base model or LoRA adapter)
    deployment: str | None = None
    concurrency: int = 1  # requests in flight on the deployment when this one was sent (GPU cost share)
    stream: bool = False
    in_flight: bool = False  # counted in gateway_requests_in_flight{model=requested_model}
    status: int = 0
    error_code: str | None = None
    outcome: str = "ok"  # ok | error | client_disconnected | upstream_failed_midstream
    attempts: list[Attempt] = field(default_factory=list)
    # routing: what moved the request off its first candidate, and what that candidate would have cost
    route: str | None = None
    primary_model: str | None = None
    rule: str | None = None
    fallback_reason: str | None = None
    route_decisions: list[str] = field(default_factory=list)
    task: str | None = None
    deadline_ms: float | None = None
    predicted_ms: float | None = None
    counterfactual_cost_usd: float = 0.0
    balance: str | None = None  # how the deployment was chosen (routing/balance.py): least_outstanding, affinity, ...
    prefix_blocks_matched: int = 0  # prompt blocks the chosen deployment was sent before (balance: prefix)
    # durations in seconds (None when not applicable, e.g. no token ever arrived)
    queue_s: float = 0.0
    upstream_s: float = 0.0  # time spent waiting on vLLM (connect, headers, every chunk read)
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float = 0.0
    overhead_s: float = 0.0
    # tokens exactly as vLLM's usage reported them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_reported: bool = False
    usage_invalid: bool = False  # vLLM sent usage that could not be true (negative, absurd): not billed
    cost_usd: float = 0.0
    # what vLLM's prefix cache saved: cached tokens at the prompt price minus what they were billed
    prefix_saved_pico_usd: int = 0
    prefix_saved_usd: float = 0.0
    # response cache, rate limits and budgets (gateway/cache.py, gateway/limits.py)
    cache: str | None = None  # hit | miss | bypass (None: the request never reached the cache stage)
    saved_usd: float = 0.0  # on a hit: what the answer cost when it was made (the hit itself costs 0)
    limited_by: str | None = None  # the limit that refused it (rpm, tpm, ...), or "skipped" (store down)
    ratelimit_headers: dict[str, str] | None = None  # x-ratelimit-* as of admission
    reservation: Any = None  # what admission reserved; settled (and cleared) at finalize

    def finish(self, now: float | None = None) -> None:
        end = time.perf_counter() if now is None else now
        self.e2e_s = end - self.started
        self.overhead_s = max(0.0, self.e2e_s - self.upstream_s - self.queue_s)

    def mark_first_token(self, now: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = now - self.started

    def mark_tokens_done(self, now: float) -> None:
        """Mean time per output token after the first: (last - first) / (n - 1)."""
        if self.ttft_s is not None and self.completion_tokens > 1:
            self.tpot_s = max(0.0, (now - self.started - self.ttft_s) / (self.completion_tokens - 1))

    def to_log(self) -> dict[str, Any]:
        return {
            "ts": round(self.wall_time, 6),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "tenant": self.tenant,
            "api_key": self.api_key_hash,
            "requested_model": self.requested_model,
            "served_model": self.served_model,
            "upstream_model": self.upstream_model,
            "deployment": self.deployment,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "error_code": self.error_code,
            "attempts": [
                {"deployment": a.deployment, "model": a.model, "outcome": a.outcome, "ms": round(a.seconds * 1e3, 3)}
                for a in self.attempts
            ],
            "route": self.route,
            "primary_model": self.primary_model,
            "rule": self.rule,
            "fallback_reason": self.fallback_reason,
            "route_decisions": self.route_decisions,
            "task": self.task,
            "deadline_ms": self.deadline_ms,
            "predicted_ms": self.predicted_ms,
            "balance": self.balance,
            "prefix_blocks_matched": self.prefix_blocks_matched,
            "counterfactual_cost_usd": self.counterfactual_cost_usd,
            "queue_ms": _ms(self.queue_s),
            "ttft_ms": _ms(self.ttft_s),
            "tpot_ms": _ms(self.tpot_s),
            "e2e_ms": _ms(self.e2e_s),
            "upstream_ms": _ms(self.upstream_s),
            "overhead_ms": _ms(self.overhead_s),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "usage_reported": self.usage_reported,
            "usage_invalid": self.usage_invalid,
            "cost_usd": self.cost_usd,
            "prefix_saved_pico_usd": self.prefix_saved_pico_usd,
            "prefix_saved_usd": self.prefix_saved_usd,
            "cache": self.cache,
            "saved_usd": self.saved_usd,
            "limited_by": self.limited_by,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
