"""Shared state for cache, limits and ledger: the Store protocol, its Redis backend (Lua scripts) and an in-process one.

Every limit check and update is one atomic Lua script (admit, settle), so any number of gateway
replicas sharing one Redis enforce one limit. Window arithmetic uses Redis's own clock (TIME). See
docs/redis.md for the key layout. The Redis backend also holds the ledger (stream + per-tenant usage
hashes). The in-process backend implements the cache and limit operations for a single gateway
process without Redis (nothing shared across replicas, nothing survives a restart).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway import usage
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


# What a cached entry costs beyond its key and value: the OrderedDict node, the tuple, the str and bytes headers.
ENTRY_OVERHEAD = 200


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


# ------------------------------------------------------------------------------------------------ Lua

# Cache lookup and stampede lock in one round trip: the entry, or (nil, 1 if this caller took the lock).
LOOKUP_LUA = """
local v = redis.call('GET', KEYS[1])
if v then return {v, 0} end
if tonumber(ARGV[1]) > 0 and redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {false, 1} end
return {false, 0}
"""

# One tenant's share of a ledger batch: add its per-hour sums to the tenant's day hashes, once per
# (writer, sequence). KEYS: writers hash, days zset, then one hash per day.  ARGV: writer, seq, ttl_s,
# oldest day kept, then per day hash: day, number of fields, field, value, ...
USAGE_LUA = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], 7 * 86400)
local ttl = tonumber(ARGV[3])
local a = 5
for k = 3, #KEYS do
  local day, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for j = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], ttl)
  redis.call('ZADD', KEYS[2], day, day)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""

# A ledger batch's entries in the stream, once per (writer, sequence): a batch re-sent after a lost reply,
# or replayed from the spool after a crash between this write and the spool's delete, adds nothing.
# A writer's batches arrive in order (gateway/ledger.py). KEYS: the writer's last sequence, the stream.
# ARGV: seq, ttl_s, maxlen (0: none), then the entries.
LEDGER_LUA = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local maxlen = tonumber(ARGV[3])
for i = 4, #ARGV do
  if maxlen > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'r', ARGV[i])
  else
    redis.call('XADD', KEYS[2], '*', 'r', ARGV[i])
  end
end
return 1
"""
# How long Redis remembers a writer's last batch (usage sums and stream): a spool replayed later than this
# after a crash between a write and its delete could count that one batch twice.
WRITER_TTL_S = 7 * 86400

# Store an entry and release its stampede lock.
PUT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


def _server_down_errors() -> tuple[type[BaseException], ...]:
    import redis
    from redis import exceptions as rx

    # SlotNotCoveredError, RedisClusterUnreachableError: a Cluster's master is gone and not yet replaced, or no
    # node answers. They are not RedisErrors; other RedisClusterExceptions are about the command (cross-slot).
    return (TimeoutError, OSError, redis.ConnectionError, redis.TimeoutError, rx.BusyLoadingError,
            rx.ReadOnlyError, rx.OutOfMemoryError, rx.MasterDownError, rx.ClusterDownError, rx.TryAgainError,
            rx.SlotNotCoveredError, rx.RedisClusterUnreachableError)


def _command_errors() -> tuple[type[BaseException], ...]:
    from redis import exceptions as rx

    return (rx.RedisError, rx.RedisClusterException)


_SERVER_DOWN_ERRORS = _server_down_errors()
_COMMAND_ERRORS = _command_errors()


class RedisStore:
    """redis-py's asyncio client; every failure becomes StoreUnavailable and is counted by `on_error`."""

    name = "redis"

    def __init__(self, url: str, prefix: str, timeout_s: float, down_for_s: float, ledger_stream: str,
                 ledger_maxlen: int | None, on_error: Callable[[str, BaseException], None],
                 usage_days: int = 400) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from gateway.redis_client import connect, is_cluster

        self.prefix = prefix
        # A Cluster: the stream's entries, each tenant's usage and the tenants set go in separate calls (one
        # slot each), and an outage is marked per hash slot, so a failing master switches off only its slots.
        self.cluster = is_cluster(url)
        self._down_slots: dict[int, float] = {}
        self._answers_logged = float("-inf")
        self.stream = prefix + ledger_stream
        self.maxlen = ledger_maxlen
        self.usage_ttl_s = usage_days * 86400
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
        self._usage = self.client.register_script(USAGE_LUA)
        self._ledger = self.client.register_script(LEDGER_LUA)

    async def start(self) -> None:
        try:
            await self.ping()
        except StoreCommandError as e:  # e.g. redis+cluster:// naming a server without cluster mode
            log.error("redis answers but refuses the gateway (check redis.url): %s", e)
        except StoreUnavailable:
            log.warning("redis is not reachable at start-up; serving without it until it answers")

    async def close(self) -> None:
        await self.client.aclose()

    async def _run(self, op: str, coro_fn: Callable[[], Any], probe: bool = False, key: str | None = None) -> Any:
        """Run one Redis call. `key`: the call's (first) key; on a Cluster its hash slot is what an error marks
        down, so tenants whose slots live on other masters keep their limits during a failover. A call
        without a key on a Cluster (ledger, usage, ping) marks nothing: those callers probe anyway."""
        slot = None
        if self.cluster:
            from redis.crc import key_slot

            slot = key_slot(key.encode()) if key is not None else None
        down_until = self.down_until if slot is None else self._down_slots.get(slot, 0.0)
        if not probe and down_until and time.monotonic() < down_until:
            raise StoreUnavailable(f"redis is marked down (operation {op})", sent=False)
        try:
            result = await coro_fn()
        except _SERVER_DOWN_ERRORS as e:
            # Redis cannot serve anyone (gone, slow, loading, a read-only replica, full): skip it a while
            if not self.cluster:
                self.down_until = time.monotonic() + self.down_for_s
            elif slot is not None:
                self._down_slots[slot] = time.monotonic() + self.down_for_s
            self._on_error(op, e)
            raise StoreUnavailable(f"redis {op} failed: {type(e).__name__}: {e}") from None
        except _COMMAND_ERRORS as e:
            # Redis answered, about this command only (bad argument, script bug): this request's error
            self._on_error(op, e)
            raise StoreCommandError(f"redis {op} refused the command: {type(e).__name__}: {e}") from None
        if down_until:
            if slot is None:
                self.down_until = 0.0
            else:
                self._down_slots.pop(slot, None)
            now = time.monotonic()
            if not self.cluster:
                log.warning("redis answers again")
            elif now - self._answers_logged >= 10.0:  # slots recover one by one (and may flap): one line per 10 s
                self._answers_logged = now
                log.warning("redis cluster answers again (slot %s)", slot)
        return result

    async def ping(self) -> None:
        await self._run("ping", self.client.ping, probe=True)

    def _cache_key(self, key: str) -> str:
        # The digest is the hash tag: an entry and its lock (LOOKUP_LUA, PUT_LUA) share one Cluster slot,
        # and the entries spread over all slots.
        return self.prefix + "c:{" + key + "}"

    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]:
        k = self._cache_key(key)
        v, locked = await self._run("cache_lookup", lambda: self._lookup(keys=[k, k + ":lock"], args=[lock_ms]), key=k)
        return v, bool(locked)

    async def cache_get(self, key: str) -> bytes | None:
        k = self._cache_key(key)
        return await self._run("cache_get", lambda: self.client.get(k), key=k)  # type: ignore[no-any-return]

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        k = self._cache_key(key)
        await self._run("cache_put", lambda: self._put(keys=[k, k + ":lock"], args=[value, int(ttl_s * 1000)]),
                        key=k)

    async def cache_unlock(self, key: str) -> None:
        k = self._cache_key(key)
        await self._run("cache_unlock", lambda: self.client.delete(k + ":lock"), key=k)

    async def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult:
        keys = [marker_key(scopes, a.lease), *(s.base for s in scopes)]
        r = await self._run("admit", lambda: self._admit(keys=keys, args=admit_args(scopes, a)), key=keys[0])
        return parse_admit(r, len(scopes))

    async def settle(self, scopes: Sequence[Scope], s: Settlement, retry: bool = False) -> list[ScopeState]:
        """Idempotent; `retry` asks Redis even while it is marked down (the settle retry loop is a probe)."""
        keys = [marker_key(scopes, s.lease), *(sc.base for sc in scopes)]
        r = await self._run("settle", lambda: self._settle(keys=keys, args=settle_args(scopes, s)), probe=retry,
                            key=keys[0])
        return parse_states(r, len(scopes))

    # ---- ledger (gateway/ledger.py LedgerBackend): the stream for export, per-tenant day hashes for usage

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}{{t:{tenant}}}"  # hash tag: a tenant's usage keys share one Cluster slot

    async def ledger_write(self, writer: str, seq: int, entries: Sequence[bytes], groups: usage.Groups) -> None:
        """One MULTI: each tenant's sums (USAGE_LUA) and the stream entries (LEDGER_LUA), each at most once
        per (writer, seq): a batch that comes again (a lost reply, a replay from the spool) adds nothing.
        On a Cluster: one call per slot (_write_cluster)."""
        by_tenant: dict[str, dict[int, list[Any]]] = {}
        for (t, day, hour, model), g in groups.items():
            fields = by_tenant.setdefault(t, {}).setdefault(day, [])
            for c, v in g.items():
                if v:
                    fields += [f"{hour:02d}|{model}|{c}", v]
        oldest = usage.day_hour(time.time() - self.usage_ttl_s)[0]
        calls: list[tuple[list[str], list[Any]]] = []  # one USAGE_LUA per tenant: its keys and args
        for t, days in by_tenant.items():
            base = self._tenant(t)
            args: list[Any] = [writer, seq, self.usage_ttl_s, oldest]
            for day, fields in days.items():
                args += [day, len(fields) // 2, *fields]
            calls.append(([base + ":uw", base + ":u:days", *(f"{base}:u:{d}" for d in days)], args))
        tenants = list(by_tenant)

        async def go() -> None:
            async with self.client.pipeline(transaction=True) as p:
                if tenants:
                    p.sadd(self.prefix + "u:tenants", *tenants)
                for keys, args in calls:
                    await self._usage(keys=keys, args=args, client=p)
                if entries:
                    await self._ledger(keys=[self._writer_key(writer), self.stream],
                                       args=[seq, WRITER_TTL_S, self.maxlen or 0, *entries], client=p)
                await p.execute()

        await self._run("ledger_append", (lambda: self._write_cluster(writer, seq, calls, tenants, entries))
                        if self.cluster else go, probe=True)

    async def _write_cluster(self, writer: str, seq: int, calls: list[tuple[list[str], list[Any]]],
                             tenants: list[str], entries: Sequence[bytes]) -> None:
        """A batch on a Cluster: one call per slot, all at once: each tenant's USAGE_LUA (atomic, at most
        once per writer and sequence), the tenants set (SADD: idempotent) and the stream entries
        (LEDGER_LUA: the stream and its writer key share a slot; at most once per writer and sequence).
        Not atomic together: if any fails the whole batch is sent again, which adds nothing twice."""
        parts: list[Any] = [self._usage(keys=keys, args=args) for keys, args in calls]
        if tenants:
            parts.append(self.client.sadd(self.prefix + "u:tenants", *tenants))
        if entries:
            parts.append(self._ledger(keys=[self._writer_key(writer), self.stream],
                                      args=[seq, WRITER_TTL_S, self.maxlen or 0, *entries]))
        for r in await asyncio.gather(*parts, return_exceptions=True):
            if isinstance(r, BaseException):
                raise r

    def _writer_key(self, writer: str) -> str:
        # in the stream's Redis Cluster slot: the stream's own name as hash tag (unless it has a tag already)
        return (self.stream if "{" in self.stream else "{" + self.stream + "}") + ":lw:" + writer

    async def ledger_read(self, cursor: str | None, start_ts: float | None,
                          count: int) -> tuple[list[bytes], str | None]:
        if cursor is None:
            cursor = "-" if start_ts is None else str(max(0, int((start_ts - 6 * 3600) * 1000)))
        start = cursor
        rows = await self._run("ledger_read", lambda: self.client.xrange(self.stream, start, "+", count), probe=True)
        if len(rows) < count:
            return [f[b"r"] for _, f in rows], None
        last = rows[-1][0]
        return [f[b"r"] for _, f in rows], "(" + (last.decode() if isinstance(last, bytes) else last)

    async def usage_groups(self, tenant: str | None, lo_hour: int | None, hi_hour: int | None) -> usage.Groups:
        """Reads only the day hashes in range: a month is ~31 HGETALLs per tenant in one pipeline."""
        lo_day = "-inf" if lo_hour is None else str(usage.day_hour(lo_hour * 3600)[0])
        hi_day = "+inf" if hi_hour is None else str(usage.day_hour(hi_hour * 3600)[0])

        async def go() -> usage.Groups:
            if tenant is not None:
                tenants = [tenant]
            else:
                members = await self.client.smembers(self.prefix + "u:tenants")
                tenants = sorted(t.decode() if isinstance(t, bytes) else t for t in members)
            async with self.client.pipeline(transaction=False) as p:
                for t in tenants:
                    p.zrangebyscore(self._tenant(t) + ":u:days", lo_day, hi_day)
                day_lists = await p.execute()
            wanted = [(t, int(d)) for t, days in zip(tenants, day_lists, strict=True) for d in days]
            async with self.client.pipeline(transaction=False) as p:
                for t, d in wanted:
                    p.hgetall(f"{self._tenant(t)}:u:{d}")
                hashes = await p.execute()
            out: usage.Groups = {}
            for (t, day), h in zip(wanted, hashes, strict=True):
                for f, v in h.items():
                    hh, rest = f.decode().split("|", 1)
                    model, counter = rest.rsplit("|", 1)
                    hour = int(hh)
                    if counter in usage.COUNTERS and usage.in_range(day, hour, lo_hour, hi_hour):
                        out.setdefault((t, day, hour, model), dict.fromkeys(usage.COUNTERS, 0))[counter] = int(v)
            return out

        return await self._run("usage_read", go, probe=True)  # type: ignore[no-any-return]


class InMemoryStore:
    """Cache and limits in one process: the embedded default when no Redis URL is configured.

    Bounded by bytes and time, never by the number of requests served: the cache is an LRU within
    `max_cache_bytes` (and `max_cache_entries`); stampede locks past their expiry are swept once a
    minute. Limits: gateway/limit_store.py. (The embedded ledger is gateway/ledger_sqlite.py.)
    """

    name = "memory"

    def __init__(self, max_cache_entries: int = 10000, max_cache_bytes: int = 32 * 1024 * 1024) -> None:
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.cache_bytes = 0
        self.locks: dict[str, float] = {}
        self.limits = MemoryLimits()
        self.max_cache_entries = max_cache_entries
        self.max_cache_bytes = max_cache_bytes
        self._next_sweep = 0.0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    def _sweep(self, now: float) -> None:
        """Forget expired stampede locks (a miss that never stored nor unlocked would leave its key)."""
        self._next_sweep = now + 60.0
        for k in [k for k, exp in self.locks.items() if exp < now]:
            del self.locks[k]

    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]:
        v = await self.cache_get(key)
        if v is not None:
            return v, False
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
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
        self.locks.pop(key, None)
        cost = len(value) + len(key) + ENTRY_OVERHEAD
        if cost > self.max_cache_bytes:
            return
        old = self.cache.pop(key, None)
        if old is not None:
            self.cache_bytes -= len(old[0]) + len(key) + ENTRY_OVERHEAD
        self.cache[key] = (value, time.time() + ttl_s)
        self.cache_bytes += cost
        while len(self.cache) > self.max_cache_entries or self.cache_bytes > self.max_cache_bytes:
            k, (v, _) = self.cache.popitem(last=False)
            self.cache_bytes -= len(v) + len(k) + ENTRY_OVERHEAD

    async def cache_unlock(self, key: str) -> None:
        self.locks.pop(key, None)

    async def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult:
        return self.limits.admit(scopes, a)

    async def settle(self, scopes: Sequence[Scope], s: Settlement, retry: bool = False) -> list[ScopeState]:
        return self.limits.settle(scopes, s)


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
        return RedisStore(r.url, r.key_prefix, r.timeout_s, r.down_for_s, r.ledger_stream, r.ledger_maxlen, on_error,
                          config.features.ledger.usage_days)
    return InMemoryStore(config.features.cache.max_entries, config.features.cache.max_bytes)
