"""Shared state for cache, limits and ledger: the Store protocol, its Redis backend (Lua scripts) and an in-process one.

Every limit check and update is one atomic Lua script (admit, settle), so any number of gateway
replicas sharing one Redis enforce one limit. Window arithmetic uses Redis's own clock (TIME). See
docs/redis.md for the key layout. The in-process backend implements the same operations for a single
gateway process without Redis (nothing shared across replicas, nothing survives a restart).
"""

from __future__ import annotations

import calendar
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.config import GatewayConfig
from gateway.limit_store import (
    ADMIT_LUA,
    SETTLE_LUA,
    Admission,
    AdmitResult,
    MemoryLimits,
    Scope,
    ScopeState,
    Settlement,
    admit_args,
    marker_key,
    parse_admit,
    parse_states,
    settle_args,
)

log = logging.getLogger("gateway.store")

LIMIT_NAMES = ("concurrency", "rpm", "tpm", "budget_day", "budget_month")


class StoreUnavailable(Exception):
    """The backend could not answer (Redis down, slow, or skipped for a while after an error)."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent  # False: skipped without asking (marked down), so the command cannot run late


class StoreCommandError(StoreUnavailable):
    """Redis answered with an error about this command (its arguments, a script bug). It says nothing about
    Redis being reachable, so it never marks Redis down; features that fail open for an outage must not fail
    open for this (limits do not). A subclass of StoreUnavailable so that other callers fail this request alone."""


class Store(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]: ...
    async def cache_get(self, key: str) -> bytes | None: ...
    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def cache_unlock(self, key: str) -> None: ...
    async def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult: ...
    async def settle(self, scopes: Sequence[Scope], s: Settlement, retry: bool = False) -> list[ScopeState]: ...
    async def ledger_append(self, entries: Sequence[bytes]) -> None: ...
    async def ledger_range(self, start: str, end: str, count: int) -> list[tuple[str, bytes]]: ...


# ------------------------------------------------------------------------------------------------ Lua

# Cache lookup and stampede lock in one round trip: the entry, or (nil, 1 if this caller took the lock).
LOOKUP_LUA = """
local v = redis.call('GET', KEYS[1])
if v then return {v, 0} end
if tonumber(ARGV[1]) > 0 and redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {false, 1} end
return {false, 0}
"""

# Store an entry and release its stampede lock.
PUT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


def _server_down_errors() -> tuple[type[BaseException], ...]:
    import redis
    from redis import exceptions as rx

    return (TimeoutError, OSError, redis.ConnectionError, redis.TimeoutError, rx.BusyLoadingError,
            rx.ReadOnlyError, rx.OutOfMemoryError, rx.MasterDownError, rx.ClusterDownError, rx.TryAgainError)


_SERVER_DOWN_ERRORS = _server_down_errors()


class RedisStore:
    """redis-py's asyncio client; every failure becomes StoreUnavailable and is counted by `on_error`."""

    name = "redis"

    def __init__(self, url: str, prefix: str, timeout_s: float, down_for_s: float, ledger_stream: str,
                 ledger_maxlen: int | None, on_error: Callable[[str, BaseException], None]) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from gateway.redis_client import connect

        self.prefix = prefix
        self.stream = prefix + ledger_stream
        self.maxlen = ledger_maxlen
        self.down_for_s = down_for_s
        self.down_until = 0.0
        self._on_error = on_error
        # One retry: the first command on a pooled connection that died with a Redis restart reconnects.
        # (a redis+sentinel:// URL asks the sentinels for the master on each new connection: gateway/redis_client.py)
        self.client = connect(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                              retry=Retry(NoBackoff(), 1), health_check_interval=0, max_connections=None)
        self._admit = self.client.register_script(ADMIT_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)
        self._lookup = self.client.register_script(LOOKUP_LUA)
        self._put = self.client.register_script(PUT_LUA)

    async def start(self) -> None:
        try:
            await self.ping()
        except StoreUnavailable:
            log.warning("redis is not reachable at start-up; serving without it until it answers")

    async def close(self) -> None:
        await self.client.aclose()

    async def _run(self, op: str, coro_fn: Callable[[], Any], probe: bool = False) -> Any:
        import redis

        if not probe and self.down_until and time.monotonic() < self.down_until:
            raise StoreUnavailable(f"redis is marked down (operation {op})", sent=False)
        try:
            result = await coro_fn()
        except _SERVER_DOWN_ERRORS as e:
            # Redis cannot serve anyone (gone, slow, loading, a read-only replica, full): skip it a while
            self.down_until = time.monotonic() + self.down_for_s
            self._on_error(op, e)
            raise StoreUnavailable(f"redis {op} failed: {type(e).__name__}: {e}") from None
        except redis.RedisError as e:
            # Redis answered, about this command only (bad argument, script bug): this request's error
            self._on_error(op, e)
            raise StoreCommandError(f"redis {op} refused the command: {type(e).__name__}: {e}") from None
        if self.down_until:
            self.down_until = 0.0
            log.warning("redis answers again")
        return result

    async def ping(self) -> None:
        await self._run("ping", self.client.ping, probe=True)

    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]:
        k = self.prefix + "c:" + key
        v, locked = await self._run("cache_lookup", lambda: self._lookup(keys=[k, k + ":lock"], args=[lock_ms]))
        return v, bool(locked)

    async def cache_get(self, key: str) -> bytes | None:
        return await self._run("cache_get", lambda: self.client.get(self.prefix + "c:" + key))  # type: ignore[no-any-return]

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        k = self.prefix + "c:" + key
        await self._run("cache_put", lambda: self._put(keys=[k, k + ":lock"], args=[value, int(ttl_s * 1000)]))

    async def cache_unlock(self, key: str) -> None:
        await self._run("cache_unlock", lambda: self.client.delete(self.prefix + "c:" + key + ":lock"))

    async def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult:
        keys = [marker_key(scopes, a.lease), *(s.base for s in scopes)]
        r = await self._run("admit", lambda: self._admit(keys=keys, args=admit_args(scopes, a)))
        return parse_admit(r, len(scopes))

    async def settle(self, scopes: Sequence[Scope], s: Settlement, retry: bool = False) -> list[ScopeState]:
        """Idempotent; `retry` asks Redis even while it is marked down (the settle retry loop is a probe)."""
        keys = [marker_key(scopes, s.lease), *(sc.base for sc in scopes)]
        r = await self._run("settle", lambda: self._settle(keys=keys, args=settle_args(scopes, s)), probe=retry)
        return parse_states(r, len(scopes))

    async def ledger_append(self, entries: Sequence[bytes]) -> None:
        async def go() -> None:
            async with self.client.pipeline(transaction=True) as p:
                for e in entries:
                    p.xadd(self.stream, {"r": e}, maxlen=self.maxlen, approximate=True)
                await p.execute()

        await self._run("ledger_append", go, probe=True)

    async def ledger_range(self, start: str, end: str, count: int) -> list[tuple[str, bytes]]:
        rows = await self._run("ledger_read", lambda: self.client.xrange(self.stream, start, end, count), probe=True)
        return [(i.decode() if isinstance(i, bytes) else i, f[b"r"]) for i, f in rows]


class InMemoryStore:
    """The same operations in one process: the embedded default when no Redis URL is configured."""

    name = "memory"

    def __init__(self, max_cache_entries: int = 10000, max_ledger: int = 100_000) -> None:
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.locks: dict[str, float] = {}
        self.limits = MemoryLimits()
        self.max_cache_entries = max_cache_entries
        self.ledger: list[tuple[str, bytes]] = []
        self.max_ledger = max_ledger
        self._seq = itertools.count()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]:
        v = await self.cache_get(key)
        if v is not None:
            return v, False
        now = time.time()
        if lock_ms > 0 and self.locks.get(key, 0) < now:
            self.locks[key] = now + lock_ms / 1000
            return None, True
        return None, False

    async def cache_get(self, key: str) -> bytes | None:
        v = self.cache.get(key)
        if v is None or v[1] < time.time():
            return None
        self.cache.move_to_end(key)
        return v[0]

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        self.cache[key] = (value, time.time() + ttl_s)
        self.cache.move_to_end(key)
        while len(self.cache) > self.max_cache_entries:
            self.cache.popitem(last=False)
        self.locks.pop(key, None)

    async def cache_unlock(self, key: str) -> None:
        self.locks.pop(key, None)

    async def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult:
        return self.limits.admit(scopes, a)

    async def settle(self, scopes: Sequence[Scope], s: Settlement, retry: bool = False) -> list[ScopeState]:
        return self.limits.settle(scopes, s)

    async def ledger_append(self, entries: Sequence[bytes]) -> None:
        ms = int(time.time() * 1000)
        for e in entries:
            self.ledger.append((f"{ms}-{next(self._seq)}", e))
        if len(self.ledger) > self.max_ledger:
            del self.ledger[: len(self.ledger) - self.max_ledger]

    async def ledger_range(self, start: str, end: str, count: int) -> list[tuple[str, bytes]]:
        lo, hi = _id_key(start, 0), _id_key(end, 1 << 62)
        exclusive = start.startswith("(")
        out = []
        for i, e in self.ledger:
            k = _id_key(i, 0)
            if (k > lo if exclusive else k >= lo) and k <= hi:
                out.append((i, e))
                if len(out) >= count:
                    break
        return out


def _id_key(stream_id: str, default_seq: int) -> tuple[int, int]:
    s = stream_id.lstrip("(")
    if s == "-":
        return (0, 0)
    if s == "+":
        return (1 << 62, 1 << 62)
    ms, _, seq = s.partition("-")
    return (int(ms), int(seq) if seq else default_seq)


def month_end_s(now: float) -> float:
    """Seconds until the next UTC calendar month starts."""
    t = time.gmtime(now)
    days = calendar.monthrange(t.tm_year, t.tm_mon)[1]
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    return start + days * 86400 - now


def build_store(config: GatewayConfig, on_error: Callable[[str, BaseException], None]) -> Store:
    """Redis when config names a URL; otherwise the in-process backend (one process, nothing survives)."""
    r = config.features.redis
    if r.url:
        return RedisStore(r.url, r.key_prefix, r.timeout_s, r.down_for_s, r.ledger_stream, r.ledger_maxlen, on_error)
    return InMemoryStore(config.features.cache.max_entries)
