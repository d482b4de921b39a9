"""Admit stage: rate limits and budgets per API key and tenant (reserve up front, reconcile after), 429s.

A request counts against its key's scope and its tenant's scope (each only where config sets limits).
Admission reserves the request's tokens (`max_tokens`, or the configured default, plus an estimate of
the prompt) and its highest possible cost; `settle` corrects both to the real usage once the record is
final, and frees the concurrency slot. Both are single atomic scripts in the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import GatewayConfig, Limits, Model
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.store import AdmitResult, Scope, ScopeState, Store, StoreUnavailable, month_end_s

log = logging.getLogger("gateway.limits")

_MESSAGES = {
    "rpm": "Rate limit reached for requests per minute",
    "tpm": "Rate limit reached for tokens per minute",
    "concurrency": "Too many concurrent requests",
    "budget_day": "Daily budget exhausted",
    "budget_month": "Monthly budget exhausted",
}


@dataclass(slots=True)
class Reservation:
    """What admit took, so that settle can give back the difference."""

    scopes: tuple[Scope, ...]
    minute: int
    day: int
    month: int
    tokens: int
    cost: float
    lease: str


class Limiter(Protocol):
    async def admit(self, rec: RequestRecord, model: Model, body: dict[str, Any]) -> None: ...
    def settle(self, rec: RequestRecord) -> None: ...
    def budget_used_fraction(self, tenant: str) -> float: ...
    async def close(self) -> None: ...


class NullLimiter:
    """No limits configured anywhere: admit everything, keep no state."""

    async def admit(self, rec: RequestRecord, model: Model, body: dict[str, Any]) -> None:
        return None

    def settle(self, rec: RequestRecord) -> None:
        return None

    def budget_used_fraction(self, tenant: str) -> float:
        return 0.0

    async def close(self) -> None:
        return None


def estimate_prompt_tokens(body: dict[str, Any], chars_per_token: float) -> int:
    """A cheap over-estimate of the prompt's tokens (no tokenizer on the hot path)."""
    chars, n = 0, 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            n += 4
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                chars += len(c)
            elif isinstance(c, list):
                chars += sum(len(str(p.get("text", ""))) for p in c if isinstance(p, dict))
        return n + 2 + math.ceil(chars / chars_per_token)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return 1 + math.ceil(len(prompt) / chars_per_token)
    if isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, int):
                n += 1
            elif isinstance(p, list):
                n += len(p)
            else:
                n += 1 + math.ceil(len(str(p)) / chars_per_token)
    return n


def reserve_tokens(body: dict[str, Any], default_max_tokens: int, chars_per_token: float) -> tuple[int, int]:
    """(prompt estimate, completion tokens reserved) for a request."""
    prompt = estimate_prompt_tokens(body, chars_per_token)
    if "messages" not in body and "prompt" not in body and "max_output_tokens" not in body:
        return prompt, 0  # embeddings (and tokenizer calls) generate nothing
    mt = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    n_raw = body.get("n")
    n = n_raw if isinstance(n_raw, int) else 1
    completion = (mt if isinstance(mt, int) and mt > 0 else default_max_tokens) * max(1, n)
    return prompt, completion


class StoreLimiter:
    """Limits enforced through a Store (Redis for many replicas, in-process for one)."""

    def __init__(self, config: GatewayConfig, store: Store, on_spend: Callable[[str, str, float], None]) -> None:
        f = config.features
        self.store = store
        self.prefix = f.redis.key_prefix + "rl:"
        self.fail_closed = f.redis.on_failure.limits == "closed"
        self.default_max_tokens = f.limits.default_max_tokens
        self.chars_per_token = f.limits.chars_per_token
        self.lease_ms = int(f.limits.lease_s * 1000)
        self._tenant_scopes = {t: Scope(self.prefix + "t:" + t, lim, t) for t, lim in f.tenant_limits.items()}
        self._key_scopes = {k: Scope(self.prefix + "k:" + k, lim) for k, lim in f.key_limits.items()}
        self._no_scopes: tuple[Scope, ...] = ()
        self._on_spend = on_spend
        self._spend: dict[str, tuple[float, float]] = {}  # tenant -> last known (day, month) spend
        self._tasks: set[asyncio.Task[None]] = set()

    def scopes(self, rec: RequestRecord) -> tuple[Scope, ...]:
        k = self._key_scopes.get(rec.api_key_hash or "")
        t = self._tenant_scopes.get(rec.tenant)
        if k is None and t is None:
            return self._no_scopes
        return tuple(s for s in (k, t) if s is not None)

    async def admit(self, rec: RequestRecord, model: Model, body: dict[str, Any]) -> None:
        scopes = self.scopes(rec)
        if not scopes:
            return
        prompt, completion = reserve_tokens(body, self.default_max_tokens, self.chars_per_token)
        p = model.pricing
        cost = 0.0 if p.gpu_usd_per_second is not None else prompt * p.prompt + completion * p.completion
        lease = rec.request_id + ":" + uuid.uuid4().hex[:8]
        try:
            r = await self.store.admit(scopes, prompt + completion, cost, lease, self.lease_ms)
        except StoreUnavailable as e:
            if self.fail_closed:
                raise GatewayError(503, "Rate limits cannot be checked right now (limit store unavailable).",
                                   type="api_error", code="limits_unavailable") from e
            rec.limited_by = "skipped"
            return
        self._seen(scopes, r.states)
        rec.ratelimit_headers = self._headers(scopes, r, prompt + completion)
        if not r.ok:
            assert r.refused_limit is not None
            scope = scopes[r.refused_scope]
            rec.limited_by = r.refused_limit
            raise self._refusal(scope, r, prompt + completion, rec.ratelimit_headers)
        rec.reservation = Reservation(scopes, r.minute, r.day, r.month, prompt + completion, cost, lease)

    def settle(self, rec: RequestRecord) -> None:
        """Called from finalize (synchronous): correct the reservation in the background."""
        res = rec.reservation
        if not isinstance(res, Reservation):
            return
        rec.reservation = None
        hit = rec.cache == "hit"  # a cache hit used no vLLM tokens and costs nothing
        tokens = 0 if hit else rec.prompt_tokens + rec.completion_tokens
        cost = 0.0 if hit else rec.cost_usd
        task = asyncio.get_running_loop().create_task(self._settle(res, tokens - res.tokens, cost - res.cost))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, res: Reservation, token_delta: int, cost_delta: float) -> None:
        try:
            states = await self.store.settle(res.scopes, res.minute, res.day, res.month, token_delta, cost_delta,
                                             res.lease)
        except StoreUnavailable:
            return  # logged and counted by the store; the concurrency lease expires on its own
        self._seen(res.scopes, states)

    def _seen(self, scopes: tuple[Scope, ...], states: list[ScopeState]) -> None:
        for s, st in zip(scopes, states, strict=False):
            if s.tenant is not None and (s.limits.budget_day or s.limits.budget_month):
                self._spend[s.tenant] = (st.spend_day, st.spend_month)
                self._on_spend(s.tenant, "day", st.spend_day)
                self._on_spend(s.tenant, "month", st.spend_month)

    def budget_used_fraction(self, tenant: str) -> float:
        """Largest of day/month spend / budget, from the last known figures (0.0 without a budget)."""
        spend = self._spend.get(tenant)
        scope = self._tenant_scopes.get(tenant)
        if spend is None or scope is None:
            return 0.0
        lim = scope.limits
        return max(spend[0] / lim.budget_day if lim.budget_day else 0.0,
                   spend[1] / lim.budget_month if lim.budget_month else 0.0)

    @staticmethod
    def _headers(scopes: tuple[Scope, ...], r: AdmitResult, tokens: int) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the tightest scope that has each limit."""
        h: dict[str, str] = {}
        reqs = [(s.limits.rpm - st.requests, s.limits.rpm) for s, st in zip(scopes, r.states, strict=False)
                if s.limits.rpm]
        toks = [(s.limits.tpm - st.tokens, s.limits.tpm) for s, st in zip(scopes, r.states, strict=False)
                if s.limits.tpm]
        if reqs:
            left, limit = min(reqs)
            h["x-ratelimit-limit-requests"] = str(limit)
            h["x-ratelimit-remaining-requests"] = str(max(0, left if r.ok else left))
            h["x-ratelimit-reset-requests"] = f"{r.reset_s}s"
        if toks:
            left, limit = min(toks)
            h["x-ratelimit-limit-tokens"] = str(limit)
            h["x-ratelimit-remaining-tokens"] = str(max(0, left))
            h["x-ratelimit-reset-tokens"] = f"{r.reset_s}s"
        return h

    @staticmethod
    def _refusal(scope: Scope, r: AdmitResult, tokens: int, headers: dict[str, str]) -> GatewayError:
        name = r.refused_limit or "rpm"
        lim: Limits = scope.limits
        st = r.states[r.refused_scope]
        who = f"tenant {scope.tenant}" if scope.tenant else "this API key"
        now = time.time()
        if name == "rpm":
            detail, retry = f"limit {lim.rpm}, used {st.requests}", r.reset_s
        elif name == "tpm":
            detail, retry = f"limit {lim.tpm}, used {st.tokens}, this request reserves {tokens}", r.reset_s
            if tokens > lim.tpm:
                detail += " (more than the whole limit: lower max_tokens)"
        elif name == "concurrency":
            detail, retry = f"limit {lim.concurrency} in flight", 1
        elif name == "budget_day":
            detail = f"budget ${lim.budget_day:g} per day, spent ${st.spend_day:.6f}"
            retry = math.ceil(86400 - now % 86400)
        else:
            detail = f"budget ${lim.budget_month:g} per month, spent ${st.spend_month:.6f}"
            retry = math.ceil(month_end_s(now))
        budget = name.startswith("budget")
        return GatewayError(
            429, f"{_MESSAGES[name]} for {who} ({detail}).",
            type="insufficient_quota" if budget else "requests",
            code=f"{name}_exceeded" if budget else "rate_limit_exceeded", param=name,
            headers={**headers, "retry-after": str(max(1, retry))})

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def build_limiter(config: GatewayConfig, store: Store, on_spend: Callable[[str, str, float], None]) -> Limiter:
    f = config.features
    if not f.tenant_limits and not f.key_limits:
        return NullLimiter()
    return StoreLimiter(config, store, on_spend)
