"""The one record every request builds; headers, log line, metrics and ledger are all written from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.money import usd


@dataclass(slots=True)
class Attempt:
    """One try on one deployment; an abandoned one carries what vLLM did for it (its waste)."""

    deployment: str
    model: str  # the name vLLM knows
    outcome: str  # "ok", or why it failed: connect_error, first_token_timeout, upstream_503, ...
    seconds: float  # upstream time (after the slot was granted)
    public_model: str | None = None  # the public model whose prices apply
    queue_s: float = 0.0
    gpu_s: float = 0.0  # its share of the deployment's busy time (docs/config.md, GPU-time share)
    # What vLLM reported doing for an abandoned attempt ("reported"), or "unknown" when it ended before
    # vLLM said anything (a non-stream request cut off); "none": vLLM did no work (refused, unreachable).
    usage: str = "none"
    prompt_tokens: int = 0  # as usage counts them (each prompt once)
    fanout_prompt_tokens: int = 0  # the extra choices' prefills (n > 1)
    completion_tokens: int = 0
    cost_pico_usd: int = 0


# How a request ended (docs/accounting.md has what each one bills and counts as waste).
OUTCOMES = (
    "ok",  # answered in full
    "error",  # refused or failed before any response byte (the status says why)
    "timeout",  # the upstream did not finish within its total timeout: 504
    "client_left_before_response",  # gone while waiting (body, limits, queue, before the first token)
    "client_left_midstream",  # gone while the stream flowed
    "client_left_slow_reader",  # gone after holding the stream back by not reading
    "upstream_failed_midstream",  # vLLM died, stalled or sent an error event after the first token
    "gateway_shutdown",  # cut by the gateway stopping
)


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
    gpu_s: float = 0.0  # this request's share of its deployment's busy time (GPU-time cost basis)
    stream: bool = False
    in_flight: bool = False  # counted in gateway_requests_in_flight{model=requested_model}
    status: int = 0
    error_code: str | None = None
    outcome: str = "ok"  # one of OUTCOMES: how the request ended
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
    counterfactual_cost_pico_usd: int = 0
    balance: str | None = None  # how the deployment was chosen (routing/balance.py): least_outstanding, affinity, ...
    prefix_blocks_matched: int = 0  # prompt blocks the chosen deployment was sent before (balance: prefix)
    # durations in seconds (None when not applicable, e.g. no token ever arrived)
    queue_s: float = 0.0
    upstream_s: float = 0.0  # time spent waiting on vLLM (connect, headers, every chunk read)
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float = 0.0
    overhead_s: float = 0.0
    client_wait_s: float = 0.0  # time blocked writing to a client that read slowly (back-pressure)
    # tokens exactly as vLLM's usage reported them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    fanout_prompt_tokens: int = 0  # prefills of the extra choices (n > 1): vLLM did them, usage counts one
    wasted_prompt_tokens: int = 0  # what vLLM did for abandoned attempts (timeouts, fallbacks): not billed
    wasted_completion_tokens: int = 0
    usage_reported: bool = False
    usage_invalid: bool = False  # vLLM sent usage that could not be true (negative, absurd): not billed
    cost_pico_usd: int = 0  # exact money: pico-USD (gateway/money.py)
    wasted_cost_pico_usd: int = 0
    # what vLLM's prefix cache saved: cached tokens at the prompt price minus what they were billed
    prefix_saved_pico_usd: int = 0
    # response cache, rate limits and budgets (gateway/cache.py, gateway/limits.py)
    cache: str | None = None  # hit | miss | bypass (None: the request never reached the cache stage)
    saved_pico_usd: int = 0  # on a hit: what the answer cost when it was made (the hit itself costs 0)
    limited_by: str | None = None  # the limit that refused it (rpm, tpm, ...), or "skipped" (store down)
    ratelimit_headers: dict[str, str] | None = None  # x-ratelimit-* as of admission
    reservation: Any = None  # what admission reserved; settled (and cleared) at finalize
    final_line: bytes | None = None  # the record's JSON line, once finalized (finalize runs once)

    @property
    def cost_usd(self) -> float:
        return usd(self.cost_pico_usd)

    @property
    def saved_usd(self) -> float:
        return usd(self.saved_pico_usd)

    def finish(self, now: float | None = None) -> None:
        end = time.perf_counter() if now is None else now
        self.e2e_s = end - self.started
        self.overhead_s = max(0.0, self.e2e_s - self.upstream_s - self.queue_s - self.client_wait_s)

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
            "attempts": [_attempt_log(a) for a in self.attempts],
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
            "counterfactual_cost_usd": usd(self.counterfactual_cost_pico_usd),
            "counterfactual_cost_pico_usd": self.counterfactual_cost_pico_usd,
            "queue_ms": _ms(self.queue_s),
            "ttft_ms": _ms(self.ttft_s),
            "tpot_ms": _ms(self.tpot_s),
            "e2e_ms": _ms(self.e2e_s),
            "upstream_ms": _ms(self.upstream_s),
            "overhead_ms": _ms(self.overhead_s),
            "client_wait_ms": _ms(self.client_wait_s),
            "gpu_ms": _ms(self.gpu_s),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "fanout_prompt_tokens": self.fanout_prompt_tokens,
            "wasted_prompt_tokens": self.wasted_prompt_tokens,
            "wasted_completion_tokens": self.wasted_completion_tokens,
            "usage_reported": self.usage_reported,
            "usage_invalid": self.usage_invalid,
            "cost_usd": usd(self.cost_pico_usd),
            "cost_pico_usd": self.cost_pico_usd,
            "wasted_cost_pico_usd": self.wasted_cost_pico_usd,
            "prefix_saved_usd": usd(self.prefix_saved_pico_usd),
            "prefix_saved_pico_usd": self.prefix_saved_pico_usd,
            "cache": self.cache,
            "saved_usd": usd(self.saved_pico_usd),
            "saved_pico_usd": self.saved_pico_usd,
            "limited_by": self.limited_by,
        }


def _attempt_log(a: Attempt) -> dict[str, Any]:
    out: dict[str, Any] = {"deployment": a.deployment, "model": a.model, "outcome": a.outcome,
                           "ms": round(a.seconds * 1e3, 3), "queue_ms": round(a.queue_s * 1e3, 3)}
    if a.outcome != "ok":
        out.update(usage=a.usage, prompt_tokens=a.prompt_tokens, fanout_prompt_tokens=a.fanout_prompt_tokens,
                   completion_tokens=a.completion_tokens, gpu_ms=round(a.gpu_s * 1e3, 3),
                   cost_pico_usd=a.cost_pico_usd)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
