"""Cache stage: exact-match response cache (key normalisation, policy, stampede coalescing, SSE replay).

Key: SHA-256 of the tenant's cache scope, the model the plan sends the request to (with its upstream
model names, so an adapter is its own model), the endpoint, whether it streams, and the request body
without the fields that do not change the output. Only deterministic requests are cached unless
config says otherwise. Identical concurrent non-streaming misses are coalesced: in one process they
wait on the first one's future; across replicas a short Redis lock makes the others poll for the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.apis.contract import contract_of
from gateway.config import GatewayConfig, Model
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.store import Store, StoreUnavailable

log = logging.getLogger("gateway.cache")

# Body fields that do not change the answer (or that the gateway rewrites): left out of the key.
IGNORED_FIELDS = frozenset({"model", "stream", "stream_options", "user", "request_id", "priority", "metadata",
                            "store", "cache_salt"})


@dataclass(slots=True)
class Entry:
    """A cached answer: a JSON body, or the upstream SSE payloads of a complete stream, and its accounting."""

    kind: str  # json | sse
    body: bytes  # json: the response body; sse: the data payloads, one per line
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_pico_usd: int
    served_model: str
    upstream_model: str | None

    def encode(self) -> bytes:
        meta = orjson.dumps({"k": self.kind, "p": self.prompt_tokens, "c": self.completion_tokens,
                             "ct": self.cached_tokens, "pusd": self.cost_pico_usd, "s": self.served_model,
                             "u": self.upstream_model})
        return meta + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        meta, _, body = raw.partition(b"\n")
        m = orjson.loads(meta)
        entry = cls(m["k"], body, m["p"], m["c"], m["ct"], m["pusd"], m["s"], m["u"])
        if (entry.kind not in ("json", "sse") or not all(isinstance(t, int) for t in (
                entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens, entry.cost_pico_usd))
                or not isinstance(entry.served_model, str)):
            raise ValueError("cache entry fields have the wrong types")
        return entry

    def payloads(self) -> list[bytes]:
        return self.body.split(b"\n")

    def apply(self, rec: RequestRecord) -> None:
        """A hit: the record carries the answer's tokens (marked cached), costs 0 and saves what it cost."""
        rec.end.cache = "hit"
        rec.routing.served_model, rec.routing.upstream_model = self.served_model, self.upstream_model
        rec.usage.prompt_tokens, rec.usage.completion_tokens = self.prompt_tokens, self.completion_tokens
        rec.usage.cached_tokens, rec.usage.usage_reported = self.cached_tokens, True
        rec.money.saved_pico_usd = self.cost_pico_usd


@dataclass(slots=True, eq=False)
class Lookup:
    """One request's cache handle: its key, a hit if any, and what it must do when it finishes."""

    key: str | None = None
    model: str | None = None
    ttl_s: float = 0.0
    may_store: bool = False
    entry: Entry | None = None
    future: asyncio.Future[Entry | None] | None = None  # set while this request leads a coalesced miss
    locked: bool = False  # holds the cross-replica stampede lock
    done: bool = False
    max_bytes: int = 0  # a stream recorded for storing stops being kept past this (max_entry_bytes)


NO_LOOKUP = Lookup()


class ResponseCache(Protocol):
    async def lookup(self, rec: RequestRecord, model: Model, endpoint: str, body: dict[str, Any],
                     cache_control: bytes | None, stream: bool) -> Lookup: ...
    def store(self, lk: Lookup, rec: RequestRecord, kind: str, body: bytes) -> None: ...
    def release(self, lk: Lookup) -> None: ...
    async def close(self) -> None: ...


class NullCache:
    """Caching is off for every tenant and model."""

    async def lookup(self, rec: RequestRecord, model: Model, endpoint: str, body: dict[str, Any],
                     cache_control: bytes | None, stream: bool) -> Lookup:
        rec.end.cache = "bypass"
        return NO_LOOKUP

    def store(self, lk: Lookup, rec: RequestRecord, kind: str, body: bytes) -> None:
        return None

    def release(self, lk: Lookup) -> None:
        return None

    async def close(self) -> None:
        return None


def cacheable(mode: str, endpoint: str, body: dict[str, Any]) -> bool:
    contract = contract_of(endpoint)
    if not contract.cacheable(body):  # e.g. a stored response has an identity (its id): never another's answer
        return False
    if mode == "all":
        return True
    if mode == "off":
        return False
    if not contract.output_fields:  # nothing is sampled (embeddings): the answer is deterministic
        return True
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(scope: str, model: Model, endpoint: str, stream: bool, body: dict[str, Any]) -> str:
    norm = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    upstream = sorted({d.upstream_model for d in model.deployments})
    if model.adapter is not None:  # a catalogue adapter: answers change when its weights (path) do
        upstream = [model.adapter.name, model.adapter.path]
    raw = orjson.dumps([scope, model.name, upstream, endpoint, stream, norm], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


def parse_cache_control(value: bytes | None) -> tuple[bool, bool]:
    """(no_cache, no_store) from a request's Cache-Control header."""
    if not value:
        return False, False
    directives = {d.strip().split(b"=", 1)[0].lower() for d in value.split(b",")}
    return b"no-cache" in directives, b"no-store" in directives


class StoreCache:
    def __init__(self, config: GatewayConfig, store: Store, on_corrupt: Callable[[], None] = lambda: None) -> None:
        f = config.features
        self.features = f
        self.backend = store
        self.fail_closed = f.redis.on_failure.cache == "closed"
        self.coalesce = f.cache.coalesce
        self.wait_s = f.cache.coalesce_wait_s
        self.lock_ms = int(f.cache.coalesce_wait_s * 1000)
        self.max_entry = f.cache.max_entry_bytes
        self.on_corrupt = on_corrupt
        self._corrupt_logged = float("-inf")
        self._inflight: dict[str, asyncio.Future[Entry | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def lookup(self, rec: RequestRecord, model: Model, endpoint: str, body: dict[str, Any],
                     cache_control: bytes | None, stream: bool) -> Lookup:
        policy = self.features.cache_policy(rec.identity.tenant, model.name)
        if not cacheable(policy.mode, endpoint, body):
            rec.end.cache = "bypass"
            return NO_LOOKUP
        no_cache, no_store = parse_cache_control(cache_control)
        key = cache_key(policy.scope, model, endpoint, stream, body)
        lk = Lookup(key, model.name, policy.ttl_s, not no_store, max_bytes=self.max_entry)
        if no_cache:
            rec.end.cache = "bypass"
            return lk
        coalesce = self.coalesce and not stream  # a follower of a stream would lose its time to first token
        if coalesce:
            leader = self._inflight.get(key)
            if leader is not None:
                try:
                    entry = await asyncio.wait_for(asyncio.shield(leader), self.wait_s)
                except TimeoutError:
                    entry = None
                if entry is not None:
                    entry.apply(rec)
                    lk.entry, lk.may_store = entry, False
                    return lk
            else:
                lk.future = asyncio.get_running_loop().create_future()
                self._inflight[key] = lk.future
        try:
            entry = await self._fetch(lk, coalesce)
        except StoreUnavailable as e:
            self.release(lk)
            if self.fail_closed:
                raise GatewayError(503, "The response cache is unavailable.", type="api_error",
                                   code="cache_unavailable") from e
            rec.end.cache = "bypass"
            return Lookup()
        if entry is None:
            rec.end.cache = "miss"
            return lk
        entry.apply(rec)
        lk.entry, lk.may_store = entry, False
        self._resolve(lk, entry)
        return lk

    async def _fetch(self, lk: Lookup, coalesce: bool) -> Entry | None:
        assert lk.key is not None
        raw, lk.locked = await self.backend.cache_lookup(lk.key, self.lock_ms if coalesce else 0)
        if raw is not None:
            return self._decode(raw)
        if not coalesce or lk.locked:
            return None
        # Another replica is computing this answer: poll until it is stored or its lock goes away.
        deadline = time.monotonic() + self.wait_s
        delay = 0.005
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            raw, lk.locked = await self.backend.cache_lookup(lk.key, self.lock_ms)
            if raw is not None:
                return self._decode(raw)
            if lk.locked:
                return None
        return None

    def _decode(self, raw: bytes) -> Entry | None:
        """A stored entry, or None (a miss, so the answer is computed and stored again) when it is corrupt."""
        try:
            return Entry.decode(raw)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # orjson.JSONDecodeError is a ValueError
            self.on_corrupt()
            now = time.monotonic()
            if now - self._corrupt_logged >= 10.0:  # one line per 10 s, whatever the rate
                self._corrupt_logged = now
                log.warning("undecodable cache entry treated as a miss: %s: %s", type(e).__name__, e)
            return None

    def store(self, lk: Lookup, rec: RequestRecord, kind: str, body: bytes) -> None:
        """Keep a finished, successful answer (never one that ended in error or came from another model)."""
        if (lk.key is None or not lk.may_store or lk.done or rec.end.status != 200 or rec.end.outcome != "ok"
                or rec.routing.served_model != lk.model or len(body) > self.max_entry):
            return
        u = rec.usage
        entry = Entry(kind, body, u.prompt_tokens, u.completion_tokens, u.cached_tokens, rec.money.cost_pico_usd,
                      rec.routing.served_model or "", rec.routing.upstream_model)
        self._resolve(lk, entry)
        lk.done = True
        self._background(self._put(lk.key, entry.encode(), lk.ttl_s))

    async def _put(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.backend.cache_put(key, value, ttl_s)
        except StoreUnavailable:
            # Don't leave other replicas polling a lock until it expires: try to drop it once Redis answers.
            await asyncio.sleep(self.features.redis.down_for_s)
            await self.backend.cache_unlock(key)

    def release(self, lk: Lookup) -> None:
        """Always called when the request ends: wake followers and drop the lock if nothing was stored."""
        self._resolve(lk, None)
        if lk.locked and not lk.done and lk.key is not None:
            lk.done = True
            self._background(self.backend.cache_unlock(lk.key))

    def _resolve(self, lk: Lookup, entry: Entry | None) -> None:
        fut = lk.future
        if fut is not None:
            lk.future = None
            if not fut.done():
                fut.set_result(entry)
            if lk.key is not None and self._inflight.get(lk.key) is fut:
                del self._inflight[lk.key]

    def _background(self, coro: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):  # counted and logged by the store
                await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def build_cache(config: GatewayConfig, store: Store, on_corrupt: Callable[[], None] = lambda: None) -> ResponseCache:
    if all(p.mode == "off" for p in config.features.cache_policies.values()):
        return NullCache()
    return StoreCache(config, store, on_corrupt)
