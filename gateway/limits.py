"""Admit stage: rate limits and budgets per API key and tenant (reserve up front, reconcile after), 429s.

A request counts against its key's scope and its tenant's scope (each only where config sets limits).
Admission first bounds the request's output in the body sent to vLLM (gateway/reservation.py), then
reserves that upper bound (tokens, and cost in pico-USD) in one atomic, idempotent store script;
`settle` corrects both to the real usage once the record is final and frees the concurrency slot.
A settle that cannot reach Redis is kept and retried until Redis answers; it works whether or not
the admission ran (a command Redis queued during a stall and ran after the gateway gave up on it).
Kept settles also go to the spool (gateway/spool.py), so a replica killed or stopped during an outage
loses no budget charge: the next gateway on the same file applies them, once (the marker's tombstone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from gateway.config import GatewayConfig, Limits, Model
from gateway.errors import GatewayError
from gateway.limit_store import SETTLE_REPLAY_MS, TOMBSTONE_MS, Admission, AdmitResult, Scope, ScopeState, Settlement
from gateway.metrics import GatewayMetrics
from gateway.money import to_pico, usd, usd_text
from gateway.prompt_tokens import BYTE_BOUND, PromptCounter, load_counters
from gateway.record import RequestRecord
from gateway.reservation import OutputBounds, bound_output, prompt_bound, reserve
from gateway.spool import Spool, SpoolError
from gateway.store import Store, StoreCommandError, StoreUnavailable, month_end_s

log = logging.getLogger("gateway.limits")

_MESSAGES = {
    "rpm": "Rate limit reached for requests per minute",
    "tpm": "Rate limit reached for tokens per minute",
    "concurrency": "Too many concurrent requests",
    "budget_day": "Daily budget exhausted",
    "budget_month": "Monthly budget exhausted",
}
MAX_PICO = 1 << 62  # every amount sent to Redis stays a valid 64-bit integer, summed or not
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 0.25  # settle retries: soon after Redis answers again, never a busy loop
LOG_EVERY_S = 10.0


@dataclass(slots=True)
class Reservation:
    """What admit took (or would have taken, when the store could not be asked), for settle to correct."""

    scopes: tuple[Scope, ...]
    lease: str
    tokens: int
    cost: int  # pico-USD


Candidates = Model | Sequence[Model]  # the plan's models in fallback order; the first one bounds the body


def _models(models: Candidates) -> Sequence[Model]:
    return (models,) if isinstance(models, Model) else models


class Limiter(Protocol):
    async def admit(self, rec: RequestRecord, models: Candidates, body: dict[str, Any],
                    stored_context: int = 0) -> None: ...
    def settle(self, rec: RequestRecord) -> None: ...
    def budget_used_fraction(self, tenant: str) -> float: ...
    async def start(self) -> None: ...
    async def sync_spool(self) -> None: ...
    async def close(self) -> None: ...


class Bounds:
    """Each model's output bounds, resolved from config once; rebuilt only when the context window the
    routing layer learned from vLLM changes."""

    def __init__(self, config: GatewayConfig, window: Callable[[Model], int | None] | None = None,
                 counters: dict[str, PromptCounter] | None = None) -> None:
        self.defaults = config.features.limits
        self.window = window or (lambda m: m.context_window)
        self._resolved: dict[str, OutputBounds] = {}
        self._counters = counters if counters is not None else load_counters(
            {m.name: m.tokenizer for m in config.models.values()})

    def counters(self, models: Sequence[Model]) -> list[PromptCounter]:
        """The distinct counters of the candidates: a prompt is reserved at the largest of their counts."""
        out: list[PromptCounter] = []
        for m in models:
            c = self._counters.get(m.name, BYTE_BOUND)
            if all(c is not o for o in out):
                out.append(c)
        return out

    def of(self, model: Model) -> OutputBounds:
        window = self.window(model)
        b = self._resolved.get(model.name)
        if b is None or b.context_window != window:
            d = self.defaults
            caps = [c for c in (model.max_output_tokens, d.max_output_tokens) if c is not None]
            b = self._resolved[model.name] = OutputBounds(
                model.default_max_tokens or d.default_max_tokens, min(caps) if caps else None, window,
                d.media_part_tokens)
        return b


class NullLimiter:
    """No limits configured anywhere: admit everything, keep no state; the output bound is still set."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds

    async def admit(self, rec: RequestRecord, models: Candidates, body: dict[str, Any],
                    stored_context: int = 0) -> None:
        ms = _models(models)
        b = self.bounds.of(ms[0])
        # The prompt only matters to keep a default bound inside a known context window, and a tokenizer's
        # count costs ~0.1-0.3 ms: only when the byte bound (~5 us) says the prompt may come near the window.
        endpoint = rec.identity.endpoint
        if b.context_window and prompt_bound(body, endpoint, b, (BYTE_BOUND,), stored_context) + \
                b.default_max_tokens > b.context_window:
            reserve(body, endpoint, b, self.bounds.counters(ms[:1]), stored_context)
        else:
            bound_output(body, endpoint, b)

    def settle(self, rec: RequestRecord) -> None:
        return None

    def budget_used_fraction(self, tenant: str) -> float:
        return 0.0

    async def start(self) -> None:
        return None

    async def sync_spool(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _Throttled:
    """One log line per interval per kind (an outage must not flood the log)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self.last[kind] = now
            log.warning(msg, *args)


class StoreLimiter:
    """Limits enforced through a Store (Redis for many replicas, in-process for one)."""

    def __init__(self, config: GatewayConfig, store: Store, on_spend: Callable[[str, str, float], None],
                 metrics: GatewayMetrics | None = None, bounds: Bounds | None = None,
                 spool: Spool | None = None) -> None:
        f = config.features
        self.store = store
        self.prefix = f.redis.key_prefix
        self.fail_closed = f.redis.on_failure.limits == "closed"
        self.bounds = bounds or Bounds(config)
        self.lease_ms = int(f.limits.lease_s * 1000)
        self.max_pending = f.limits.settle_retry_max
        self._tenant_limits = f.tenant_limits
        self._key_limits = f.key_limits
        self._scopes: dict[tuple[str, str], tuple[Scope, ...]] = {}
        self._on_spend = on_spend
        self._metrics = metrics
        self._spend: dict[str, tuple[int, int]] = {}  # tenant -> last known (day, month) spend, pico-USD
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: OrderedDict[str, tuple[tuple[Scope, ...], Settlement]] = OrderedDict()
        self._retrier: asyncio.Task[None] | None = None
        self._log = _Throttled()
        # The spool: kept settles written to disk (by a task of their own, and before a response ends
        # while Redis fails: sync_spool), deleted once Redis took them.
        self.spool = spool
        self._to_spool: dict[str, tuple[tuple[Scope, ...], Settlement]] = {}
        self._spooled: set[str] = set()
        self._spool_lock = asyncio.Lock()
        self._spooler: asyncio.Task[None] | None = None
        self._sync_wait_s = max(0.1, f.redis.timeout_s * 2)

    def _scope(self, tenant: str, kind: str, ident: str, lim: Limits, tenant_scope: bool) -> Scope:
        # The tenant's hash tag on every key of the request (Redis Cluster: one slot per script call).
        tag = f"{self.prefix}{{t:{tenant}}}"
        return Scope(f"{tag}:rl:{kind}" + (f":{ident}" if ident else ""), tag, lim,
                     tenant if tenant_scope else None, min(to_pico(lim.budget_day), MAX_PICO),
                     min(to_pico(lim.budget_month), MAX_PICO))

    def scopes(self, rec: RequestRecord) -> tuple[Scope, ...]:
        key = rec.identity.api_key_hash or ""
        got = self._scopes.get((rec.identity.tenant, key))
        if got is None:
            k, t = self._key_limits.get(key), self._tenant_limits.get(rec.identity.tenant)
            got = tuple(s for s in (
                self._scope(rec.identity.tenant, "k", key, k, False) if k is not None else None,
                self._scope(rec.identity.tenant, "t", "", t, True) if t is not None else None) if s is not None)
            if len(self._scopes) < 100_000:  # keys and tenants come from config: bounded anyway
                self._scopes[(rec.identity.tenant, key)] = got
        return got

    async def admit(self, rec: RequestRecord, models: Candidates, body: dict[str, Any],
                    stored_context: int = 0) -> None:
        """Reserve the request's upper bound: its prompt on any candidate (plus a stored conversation it
        continues), its output bound, at the dearest candidate's prices (a fallback may serve it)."""
        ms = _models(models)
        prompt, completion = reserve(body, rec.identity.endpoint, self.bounds.of(ms[0]), self.bounds.counters(ms),
                                     stored_context)  # bounds the body sent
        scopes = self.scopes(rec)
        if not scopes:
            return
        prompt_price = max((max(m.pricing.prompt_pico, m.pricing.cached_prompt_pico) for m in ms
                            if m.pricing.gpu_usd_per_second is None), default=0)
        completion_price = max((m.pricing.completion_pico for m in ms if m.pricing.gpu_usd_per_second is None),
                               default=0)
        cost = min(MAX_PICO, prompt * prompt_price + completion * completion_price)
        tokens = prompt + completion
        res = Reservation(scopes, uuid.uuid4().hex, tokens, cost)  # a lease of our own: never the client's id
        try:
            r = await self.store.admit(scopes, Admission(res.lease, tokens, cost, self.lease_ms))
        except asyncio.CancelledError:
            self._release(res)  # the client left mid-admit: Redis may have run it, so undo it either way
            raise
        except StoreCommandError as e:
            # Redis refused this command: a bug to fix, never a reason to stop enforcing limits
            self._release(res)
            log.error("limit check failed for request %s: %s", rec.identity.request_id, e)
            raise GatewayError(500, f"Limits could not be checked (request id {rec.identity.request_id}).",
                               type="api_error", code="limits_error") from None
        except StoreUnavailable as e:
            if self.fail_closed:
                if e.sent:
                    self._release(res)  # Redis may still run the admission it queued: undo it then
                raise GatewayError(503, "Rate limits cannot be checked right now (limit store unavailable).",
                                   type="api_error", code="limits_unavailable") from e
            rec.end.limited_by = "skipped"
            rec.reservation = res  # settle counts the real usage once Redis answers (and undoes a late admit)
            if self._metrics is not None:
                self._metrics.limits_fail_open.labels(rec.identity.tenant).inc()
            self._log.warning("fail_open", "limit store unavailable: admitting without limits "
                              "(redis.on_failure.limits: open): %s", e)
            return
        self._seen(scopes, r.states)
        rec.ratelimit_headers = self._headers(scopes, r)
        if not r.ok:
            scope = scopes[max(0, r.refused_scope)]
            rec.end.limited_by = r.refused_limit or "rpm"
            raise self._refusal(scope, r, tokens, rec.ratelimit_headers)
        rec.reservation = res

    def settle(self, rec: RequestRecord) -> None:
        """Called from finalize (synchronous): correct the reservation in the background."""
        res = rec.reservation
        if not isinstance(res, Reservation):
            return
        rec.reservation = None
        hit = rec.end.cache == "hit"  # a cache hit used no vLLM tokens and costs nothing
        tokens = 0 if hit else min(MAX_PICO, max(0, rec.usage.prompt_tokens) + max(0, rec.usage.completion_tokens))
        cost = 0 if hit else min(MAX_PICO, max(0, rec.money.cost_pico_usd))  # what the tenant is billed
        self._submit(res, Settlement(res.lease, res.tokens, res.cost, tokens, cost, True, TOMBSTONE_MS))

    def _release(self, res: Reservation) -> None:
        """Give back everything an admission took (if it ran at all, now or later) and count nothing."""
        self._submit(res, Settlement(res.lease, res.tokens, res.cost, 0, 0, False, TOMBSTONE_MS))

    def _submit(self, res: Reservation, st: Settlement) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(res.scopes, st))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, scopes: tuple[Scope, ...], st: Settlement, retry: bool = False) -> bool:
        """One try; a settle Redis could not take is queued for the retry loop. True when done with it."""
        try:
            states = await self.store.settle(scopes, st, retry=retry)
        except StoreCommandError as e:
            self._dropped("command_error")
            log.error("limit settle refused by redis (lease expires after lease_s): %s", e)
            return True
        except StoreUnavailable:
            if not retry:
                self._queue(scopes, st)
            return False
        self._seen(scopes, states)
        return True

    def _queue(self, scopes: tuple[Scope, ...], st: Settlement) -> None:
        # Retried, maybe replayed after a restart: its tombstone must outlive every later try
        st = replace(st, ttl_ms=SETTLE_REPLAY_MS)
        self._pending[st.lease] = (scopes, st)
        while len(self._pending) > self.max_pending:
            lease, _ = self._pending.popitem(last=False)
            self._forget_soon(lease)
            self._dropped("overflow")
        if self.spool is not None:
            self._to_spool[st.lease] = (scopes, st)
            if self._spooler is None or self._spooler.done():
                self._spooler = asyncio.get_running_loop().create_task(self._spool_loop(), name="limit-settle-spool")
        self._pending_changed()
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_loop(), name="limit-settle-retry")

    async def _retry_loop(self) -> None:
        """Retry queued settles until Redis takes them: a blip costs at most the blip."""
        wait = RETRY_FIRST_S
        while self._pending:
            await asyncio.sleep(wait)
            done: list[str] = []
            for lease, (scopes, st) in list(self._pending.items()):
                if not await self._settle(scopes, st, retry=True):
                    wait = min(RETRY_MAX_S, wait * 2)
                    break
                self._pending.pop(lease, None)
                done.append(lease)
                wait = RETRY_FIRST_S
            self._pending_changed()
            if done:
                await self._forget(done)

    # ------------------------------------------------------------------------------------------ spool

    async def start(self) -> None:
        """Take up the settles a gateway before this one left in the spool (killed, or stopped during an outage)."""
        if self.spool is None:
            return
        try:
            rows = await self.spool.read_settles()
        except SpoolError:
            return
        for lease, body in rows:
            try:
                scopes, st = _decode_settle(body)
            except (ValueError, TypeError, IndexError, KeyError):
                log.error("limits: a spooled settle could not be read; left in the spool")
                continue
            self._pending[lease] = (scopes, st)
            self._spooled.add(lease)
        if self._pending:
            log.warning("limits: %d settles from the spool, applied when Redis answers", len(self._pending))
            self._pending_changed()
            self._retrier = asyncio.get_running_loop().create_task(self._retry_loop(), name="limit-settle-retry")

    async def sync_spool(self) -> None:
        """Settles being tried now end (Redis failing: at once), and every kept one is in the spool.
        The ledger gate calls this before a response's last bytes while Redis fails."""
        if self.spool is None:
            return
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._sync_wait_s)
        await self._write_spool()

    async def _spool_loop(self) -> None:
        while self._to_spool:
            n = len(self._to_spool)
            await self._write_spool()
            if len(self._to_spool) >= n:
                return  # the spool refused (counted, logged): they stay in memory; the next settle tries again

    async def _write_spool(self) -> None:
        assert self.spool is not None
        async with self._spool_lock:
            if not self._to_spool:
                return
            items, self._to_spool = self._to_spool, {}
            try:
                await self.spool.put_settles([(lease, _encode_settle(sc, st)) for lease, (sc, st) in items.items()])
            except SpoolError:
                self._to_spool = {**items, **self._to_spool}
                return
            self._spooled.update(items)

    async def _forget(self, leases: list[str]) -> None:
        """Redis took these settles: out of the spool (after a write of them in flight, under the lock)."""
        if self.spool is None:
            return
        async with self._spool_lock:
            for lease in leases:
                self._to_spool.pop(lease, None)
            gone = [lease for lease in leases if lease in self._spooled]
            if not gone:
                return
            try:
                await self.spool.delete_settles(gone)
            except SpoolError:
                return  # left in the spool: a replay of a settle that was applied changes nothing
            self._spooled.difference_update(gone)

    def _forget_soon(self, lease: str) -> None:
        if self.spool is not None:
            task = asyncio.get_running_loop().create_task(self._forget([lease]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pending_changed(self) -> None:
        if self._metrics is not None:
            self._metrics.limit_settles_pending.set(len(self._pending))

    def _dropped(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.limit_settles_dropped.labels(reason).inc()
        self._log.warning("settle_" + reason, "limit settle given up (%s): its concurrency lease expires "
                          "after limits.lease_s", reason)

    def _seen(self, scopes: tuple[Scope, ...], states: list[ScopeState]) -> None:
        for s, st in zip(scopes, states, strict=False):
            if s.tenant is not None and (s.budget_day or s.budget_month):
                self._spend[s.tenant] = (st.spend_day, st.spend_month)
                self._on_spend(s.tenant, "day", usd(st.spend_day))
                self._on_spend(s.tenant, "month", usd(st.spend_month))

    def budget_used_fraction(self, tenant: str) -> float:
        """Largest of day/month spend / budget, from the last known figures (0.0 without a budget)."""
        spend = self._spend.get(tenant)
        lim = self._tenant_limits.get(tenant)
        if spend is None or lim is None:
            return 0.0
        day, month = to_pico(lim.budget_day), to_pico(lim.budget_month)
        return max(spend[0] / day if day else 0.0, spend[1] / month if month else 0.0)

    @staticmethod
    def _headers(scopes: tuple[Scope, ...], r: AdmitResult) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the tightest scope that has each limit."""
        h: dict[str, str] = {}
        pairs = list(zip(scopes, r.states, strict=False))
        reqs = [(s.limits.rpm - st.requests, s.limits.rpm, st.reset_ms) for s, st in pairs if s.limits.rpm]
        toks = [(s.limits.tpm - st.tokens, s.limits.tpm, st.reset_ms) for s, st in pairs if s.limits.tpm]
        for kind, found in (("requests", reqs), ("tokens", toks)):
            if found:
                left, limit, reset_ms = min(found)
                h[f"x-ratelimit-limit-{kind}"] = str(limit)
                h[f"x-ratelimit-remaining-{kind}"] = str(max(0, left))
                h[f"x-ratelimit-reset-{kind}"] = f"{max(0.001, reset_ms / 1000):g}s"
        return h

    @staticmethod
    def _refusal(scope: Scope, r: AdmitResult, tokens: int, headers: dict[str, str]) -> GatewayError:
        name = r.refused_limit if r.refused_limit in _MESSAGES else "rpm"
        lim: Limits = scope.limits
        st = r.states[r.refused_scope] if 0 <= r.refused_scope < len(r.states) else ScopeState()
        who = f"tenant {scope.tenant}" if scope.tenant else "this API key"
        now = time.time()
        if name == "rpm":
            detail, retry = f"limit {lim.rpm} in any 60 s, used {st.requests}", r.reset_s
        elif name == "tpm":
            detail, retry = f"limit {lim.tpm} in any 60 s, used {st.tokens}, this request reserves {tokens}", \
                r.reset_s
            if tokens > lim.tpm:
                detail += " (more than the whole limit: lower max_tokens)"
        elif name == "concurrency":
            detail, retry = f"limit {lim.concurrency} in flight", 1
        elif name == "budget_day":
            detail = f"budget ${lim.budget_day:g} per day, spent ${usd_text(st.spend_day)}"
            retry = math.ceil(86400 - now % 86400)
        else:
            detail = f"budget ${lim.budget_month:g} per month, spent ${usd_text(st.spend_month)}"
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
        if self._retrier is not None and not self._retrier.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retrier, 2.0)  # one last chance for what Redis did not take
        if self._pending and self.spool is not None:
            await self._write_spool()
            left = len(self._to_spool)
            log.warning("limits: %d settles Redis did not take are in the spool %s (applied by the next start on "
                        "it)%s", len(self._pending) - left, self.spool.path,
                        f"; {left} could not be spooled and are lost" if left else "")
        elif self._pending:
            log.error("limits: %d settles could not be written before shutdown (their leases expire "
                      "after limits.lease_s)", len(self._pending))


def _encode_settle(scopes: Sequence[Scope], st: Settlement) -> bytes:
    return orjson.dumps({
        "scopes": [[s.base, s.tag, s.tenant, s.budget_day, s.budget_month, s.limits.rpm, s.limits.tpm,
                    s.limits.concurrency, s.limits.budget_day, s.limits.budget_month] for s in scopes],
        "settle": [st.lease, st.reserved_tokens, st.reserved_cost, st.tokens, st.cost, st.count_request, st.ttl_ms]})


def _decode_settle(body: bytes) -> tuple[tuple[Scope, ...], Settlement]:
    d = orjson.loads(body)
    scopes = tuple(Scope(base, tag, Limits(int(rpm), int(tpm), int(conc), float(bd_usd), float(bm_usd)), tenant,
                         int(bd), int(bm))
                   for base, tag, tenant, bd, bm, rpm, tpm, conc, bd_usd, bm_usd in d["scopes"])
    lease, rt, rc, t, c, count, ttl = d["settle"]
    return scopes, Settlement(str(lease), int(rt), int(rc), int(t), int(c), bool(count), int(ttl))


def build_limiter(config: GatewayConfig, store: Store, on_spend: Callable[[str, str, float], None],
                  metrics: GatewayMetrics | None = None,
                  window: Callable[[Model], int | None] | None = None,
                  counters: dict[str, PromptCounter] | None = None, spool: Spool | None = None) -> Limiter:
    f = config.features
    bounds = Bounds(config, window, counters)
    if not f.tenant_limits and not f.key_limits:
        return NullLimiter(bounds)
    return StoreLimiter(config, store, on_spend, metrics, bounds, spool)
