"""Shared state for cache, limits and ledger: the Store protocol, its Redis backend (Lua scripts) and an in-process one.

Every limit check and update is one atomic Lua script (admit, settle), so any number of gateway
replicas sharing one Redis enforce one limit. Window arithmetic uses Redis's own clock (TIME). See
docs/redis.md for the key layout. The Redis backend also holds the ledger (stream + per-tenant usage
hashes). The in-process backend implements the cache and limit operations for a single gateway
process without Redis (nothing shared across replicas, nothing survives a restart).
"""

from __future__ import annotations

import calendar
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import usage
from gateway.config import GatewayConfig, Limits

log = logging.getLogger("gateway.store")

# What a cached entry costs beyond its key and value: the OrderedDict node, the tuple, the str and bytes headers.
ENTRY_OVERHEAD = 200

LIMIT_NAMES = ("concurrency", "rpm", "tpm", "budget_day", "budget_month")


class StoreUnavailable(Exception):
    """The backend could not answer (Redis down, slow, or skipped for a while after an error)."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One scope a request counts against: its key prefix and its limits."""

    base: str  # e.g. "gw:rl:t:team-a" or "gw:rl:k:0123456789ab"
    limits: Limits
    tenant: str | None = None  # set for tenant scopes (spend gauges, budget pressure)


@dataclass(slots=True)
class ScopeState:
    """Counters of one scope after admit/settle: what the headers and gauges report."""

    requests: int = 0
    tokens: int = 0
    spend_day: float = 0.0
    spend_month: float = 0.0


@dataclass(slots=True)
class AdmitResult:
    ok: bool
    minute: int  # window ids the reservation was made in (settle corrects the same windows)
    day: int
    month: int
    reset_s: int  # seconds until the minute window ends
    states: list[ScopeState]
    refused_scope: int = -1
    refused_limit: str | None = None


class Store(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def cache_lookup(self, key: str, lock_ms: int) -> tuple[bytes | None, bool]: ...
    async def cache_get(self, key: str) -> bytes | None: ...
    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def cache_unlock(self, key: str) -> None: ...
    async def admit(self, scopes: Sequence[Scope], tokens: int, cost: float, lease: str,
                    lease_ms: int) -> AdmitResult: ...
    async def settle(self, scopes: Sequence[Scope], minute: int, day: int, month: int, token_delta: int,
                     cost_delta: float, lease: str) -> list[ScopeState]: ...


# ------------------------------------------------------------------------------------------------ Lua

# Shared by both scripts: the UTC date from a day number (Howard Hinnant's civil_from_days).
_DATE_LUA = """
local function ymd(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y * 10000 + m * 100 + d, y * 100 + m
end
"""

# KEYS[i]: scope base.  ARGV: tokens, cost, lease, lease_ms, then 5 limits per scope
# (rpm, tpm, concurrency, budget_day, budget_month; 0 = none).
# Returns {ok, minute, day, month, reset, refused_scope, refused_limit, then per scope: requests, tokens,
# spend_day, spend_month} (floats as strings: Lua numbers would be truncated to integers).
ADMIT_LUA = _DATE_LUA + """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(sec / 60)
local day, month = ymd(math.floor(sec / 86400))
local tokens, cost, lease, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = #KEYS
local used = {}
for i = 1, n do
  local b, o = KEYS[i], 4 + (i - 1) * 5
  local rpm, tpm, conc = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  local bd, bm = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
  local r = tonumber(redis.call('GET', b .. ':r:' .. minute) or '0')
  local tk = tonumber(redis.call('GET', b .. ':t:' .. minute) or '0')
  local sd = tonumber(redis.call('GET', b .. ':d:' .. day) or '0')
  local sm = tonumber(redis.call('GET', b .. ':m:' .. month) or '0')
  used[i] = {r, tk, sd, sm}
  local refused = nil
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', b .. ':c', '-inf', now_ms)
    if redis.call('ZCARD', b .. ':c') >= conc then refused = 'concurrency' end
  end
  if not refused and rpm > 0 and r + 1 > rpm then refused = 'rpm' end
  if not refused and tpm > 0 and tk + tokens > tpm then refused = 'tpm' end
  if not refused and bd > 0 and (sd >= bd or sd + cost > bd) then refused = 'budget_day' end
  if not refused and bm > 0 and (sm >= bm or sm + cost > bm) then refused = 'budget_month' end
  if refused then
    local out = {0, minute, day, month, 60 - sec % 60, i, refused}
    for j = 1, i do
      local u = used[j]
      table.insert(out, u[1]); table.insert(out, u[2])
      table.insert(out, tostring(u[3])); table.insert(out, tostring(u[4]))
    end
    return out
  end
end
local out = {1, minute, day, month, 60 - sec % 60, 0, ''}
for i = 1, n do
  local b, o = KEYS[i], 4 + (i - 1) * 5
  local rk, tkk = b .. ':r:' .. minute, b .. ':t:' .. minute
  local r = redis.call('INCR', rk)
  if r == 1 then redis.call('EXPIRE', rk, 120) end
  local tk = redis.call('INCRBY', tkk, tokens)
  if tk == tokens then redis.call('EXPIRE', tkk, 120) end
  local sd, sm = used[i][3], used[i][4]
  if tonumber(ARGV[o + 4]) > 0 or tonumber(ARGV[o + 5]) > 0 then
    local dk, mk = b .. ':d:' .. day, b .. ':m:' .. month
    sd = redis.call('INCRBYFLOAT', dk, cost)
    sm = redis.call('INCRBYFLOAT', mk, cost)
    if redis.call('TTL', dk) < 0 then redis.call('EXPIRE', dk, 3 * 86400) end
    if redis.call('TTL', mk) < 0 then redis.call('EXPIRE', mk, 40 * 86400) end
  end
  if tonumber(ARGV[o + 3]) > 0 then redis.call('ZADD', b .. ':c', now_ms + lease_ms, lease) end
  table.insert(out, r); table.insert(out, tk); table.insert(out, tostring(sd)); table.insert(out, tostring(sm))
end
return out
"""

# KEYS[i]: scope base.  ARGV: minute, day, month, token_delta, cost_delta, lease, then per scope a flag
# string of which counters it keeps ("t" tokens, "b" budgets, "c" concurrency).
SETTLE_LUA = """
local minute, day, month = ARGV[1], ARGV[2], ARGV[3]
local dt, dc, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local out = {}
for i = 1, #KEYS do
  local b, flags = KEYS[i], ARGV[6 + i]
  local tk = 0
  local tkk = b .. ':t:' .. minute
  if dt ~= 0 and redis.call('EXISTS', tkk) == 1 then tk = redis.call('INCRBY', tkk, dt)
  else tk = tonumber(redis.call('GET', tkk) or '0') end
  local sd = redis.call('GET', b .. ':d:' .. day) or '0'
  local sm = redis.call('GET', b .. ':m:' .. month) or '0'
  if dc ~= 0 and string.find(flags, 'b', 1, true) then
    sd = redis.call('INCRBYFLOAT', b .. ':d:' .. day, dc)
    sm = redis.call('INCRBYFLOAT', b .. ':m:' .. month, dc)
  end
  if string.find(flags, 'c', 1, true) then redis.call('ZREM', b .. ':c', lease) end
  local r = tonumber(redis.call('GET', b .. ':r:' .. minute) or '0')
  table.insert(out, r); table.insert(out, tk); table.insert(out, tostring(sd)); table.insert(out, tostring(sm))
end
return out
"""

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

# Store an entry and release its stampede lock.
PUT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


def _limit_args(scopes: Sequence[Scope]) -> list[Any]:
    args: list[Any] = []
    for s in scopes:
        lim = s.limits
        args += [lim.rpm, lim.tpm, lim.concurrency, repr(lim.budget_day), repr(lim.budget_month)]
    return args


def _states(flat: Sequence[Any], n: int) -> list[ScopeState]:
    return [ScopeState(int(flat[i * 4]), int(flat[i * 4 + 1]), float(flat[i * 4 + 2]), float(flat[i * 4 + 3]))
            for i in range(n)]


def _flags(s: Scope) -> str:
    lim = s.limits
    return "t" + ("b" if lim.budget_day or lim.budget_month else "") + ("c" if lim.concurrency else "")


class RedisStore:
    """redis-py's asyncio client; every failure becomes StoreUnavailable and is counted by `on_error`."""

    name = "redis"

    def __init__(self, url: str, prefix: str, timeout_s: float, down_for_s: float, ledger_stream: str,
                 ledger_maxlen: int | None, on_error: Callable[[str, BaseException], None],
                 usage_days: int = 400) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = prefix
        self.stream = prefix + ledger_stream
        self.maxlen = ledger_maxlen
        self.usage_ttl_s = usage_days * 86400
        self.down_for_s = down_for_s
        self.down_until = 0.0
        self._on_error = on_error
        # One retry: the first command on a pooled connection that died with a Redis restart reconnects.
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry=Retry(NoBackoff(), 1), health_check_interval=0,
                                              max_connections=None)
        self._admit = self.client.register_script(ADMIT_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)
        self._lookup = self.client.register_script(LOOKUP_LUA)
        self._put = self.client.register_script(PUT_LUA)
        self._usage = self.client.register_script(USAGE_LUA)

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
            raise StoreUnavailable(f"redis is marked down (operation {op})")
        try:
            result = await coro_fn()
        except (TimeoutError, redis.RedisError, OSError) as e:
            self.down_until = time.monotonic() + self.down_for_s
            self._on_error(op, e)
            raise StoreUnavailable(f"redis {op} failed: {type(e).__name__}: {e}") from None
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

    async def admit(self, scopes: Sequence[Scope], tokens: int, cost: float, lease: str,
                    lease_ms: int) -> AdmitResult:
        r = await self._run("admit", lambda: self._admit(
            keys=[s.base for s in scopes], args=[tokens, repr(cost), lease, lease_ms, *_limit_args(scopes)]))
        ok, minute, day, month, reset, refused_scope, refused = r[:7]
        states = _states(r[7:], (len(r) - 7) // 4)
        return AdmitResult(bool(ok), int(minute), int(day), int(month), int(reset), states, int(refused_scope) - 1,
                           (refused.decode() if isinstance(refused, bytes) else refused) or None)

    async def settle(self, scopes: Sequence[Scope], minute: int, day: int, month: int, token_delta: int,
                     cost_delta: float, lease: str) -> list[ScopeState]:
        r = await self._run("settle", lambda: self._settle(
            keys=[s.base for s in scopes],
            args=[minute, day, month, token_delta, repr(cost_delta), lease, *(_flags(s) for s in scopes)]))
        return _states(r, len(scopes))

    # ---- ledger (gateway/ledger.py LedgerBackend): the stream for export, per-tenant day hashes for usage

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}{{t:{tenant}}}"  # hash tag: a tenant's usage keys share one Cluster slot

    async def ledger_write(self, writer: str, seq: int, entries: Sequence[bytes], groups: usage.Groups) -> None:
        """One MULTI: each tenant's sums (USAGE_LUA, at most once per writer/seq) and the stream entries.
        After a lost reply the batch comes again: the sums skip it, the stream gets it twice (readers
        drop the repeats by request id and ts)."""
        by_tenant: dict[str, dict[int, list[Any]]] = {}
        for (t, day, hour, model), g in groups.items():
            fields = by_tenant.setdefault(t, {}).setdefault(day, [])
            for c, v in g.items():
                if v:
                    fields += [f"{hour:02d}|{model}|{c}", v]
        oldest = usage.day_hour(time.time() - self.usage_ttl_s)[0]

        async def go() -> None:
            async with self.client.pipeline(transaction=True) as p:
                if by_tenant:
                    p.sadd(self.prefix + "u:tenants", *by_tenant)
                for t, days in by_tenant.items():
                    base = self._tenant(t)
                    args: list[Any] = [writer, seq, self.usage_ttl_s, oldest]
                    for day, fields in days.items():
                        args += [day, len(fields) // 2, *fields]
                    await self._usage(keys=[base + ":uw", base + ":u:days", *(f"{base}:u:{d}" for d in days)],
                                      args=args, client=p)
                for e in entries:
                    p.xadd(self.stream, {"r": e}, maxlen=self.maxlen, approximate=True)
                await p.execute()

        await self._run("ledger_append", go, probe=True)

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
    `max_cache_bytes` (and `max_cache_entries`); limit counters and stampede locks past their expiry
    are swept once a minute. (The embedded ledger is gateway/ledger_sqlite.py.)
    """

    name = "memory"

    def __init__(self, max_cache_entries: int = 10000, max_cache_bytes: int = 32 * 1024 * 1024) -> None:
        self.kv: dict[str, tuple[Any, float]] = {}  # key -> (value, expires at; 0 = never)
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.cache_bytes = 0
        self.locks: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}
        self.max_cache_entries = max_cache_entries
        self.max_cache_bytes = max_cache_bytes
        self._next_sweep = 0.0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    def _get(self, k: str, default: Any = 0) -> Any:
        v = self.kv.get(k)
        if v is None or (v[1] and v[1] < time.time()):
            return default
        return v[0]

    def _sweep(self, now: float) -> None:
        """Forget expired limit counters and locks (a minute's counters would otherwise stay forever)."""
        self._next_sweep = now + 60.0
        for k in [k for k, (_, exp) in self.kv.items() if exp and exp < now]:
            del self.kv[k]
        for k in [k for k, exp in self.locks.items() if exp < now]:
            del self.locks[k]

    def _add(self, k: str, delta: Any, ttl: float) -> Any:
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        v = self.kv.get(k)
        if v is None or (v[1] and v[1] < now):
            v = (0, now + ttl)
        self.kv[k] = (v[0] + delta, v[1])
        return v[0] + delta

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

    @staticmethod
    def _windows(now: float) -> tuple[int, int, int, int]:
        t = time.gmtime(now)
        return int(now // 60), t.tm_year * 10000 + t.tm_mon * 100 + t.tm_mday, t.tm_year * 100 + t.tm_mon, \
            60 - int(now) % 60

    async def admit(self, scopes: Sequence[Scope], tokens: int, cost: float, lease: str,
                    lease_ms: int) -> AdmitResult:
        now = time.time()
        minute, day, month, reset = self._windows(now)
        states = []
        for i, s in enumerate(scopes):
            b, lim = s.base, s.limits
            st = ScopeState(self._get(f"{b}:r:{minute}"), self._get(f"{b}:t:{minute}"),
                            self._get(f"{b}:d:{day}", 0.0), self._get(f"{b}:m:{month}", 0.0))
            states.append(st)
            leases = self.leases.setdefault(b, {})
            for k in [k for k, exp in leases.items() if exp < now]:
                del leases[k]
            refused = None
            if lim.concurrency and len(leases) >= lim.concurrency:
                refused = "concurrency"
            elif lim.rpm and st.requests + 1 > lim.rpm:
                refused = "rpm"
            elif lim.tpm and st.tokens + tokens > lim.tpm:
                refused = "tpm"
            elif lim.budget_day and (st.spend_day >= lim.budget_day or st.spend_day + cost > lim.budget_day):
                refused = "budget_day"
            elif lim.budget_month and (st.spend_month >= lim.budget_month
                                       or st.spend_month + cost > lim.budget_month):
                refused = "budget_month"
            if refused:
                return AdmitResult(False, minute, day, month, reset, states, i, refused)
        for s, st in zip(scopes, states, strict=True):
            b, lim = s.base, s.limits
            st.requests = self._add(f"{b}:r:{minute}", 1, 120)
            st.tokens = self._add(f"{b}:t:{minute}", tokens, 120)
            if lim.budget_day or lim.budget_month:
                st.spend_day = self._add(f"{b}:d:{day}", cost, 3 * 86400)
                st.spend_month = self._add(f"{b}:m:{month}", cost, 40 * 86400)
            if lim.concurrency:
                self.leases[b][lease] = now + lease_ms / 1000
        return AdmitResult(True, minute, day, month, reset, states)

    async def settle(self, scopes: Sequence[Scope], minute: int, day: int, month: int, token_delta: int,
                     cost_delta: float, lease: str) -> list[ScopeState]:
        out = []
        for s in scopes:
            b, lim = s.base, s.limits
            tk = f"{b}:t:{minute}"
            tokens = self._add(tk, token_delta, 120) if token_delta and tk in self.kv else self._get(tk)
            if lim.budget_day or lim.budget_month:
                self._add(f"{b}:d:{day}", cost_delta, 3 * 86400)
                self._add(f"{b}:m:{month}", cost_delta, 40 * 86400)
            self.leases.get(b, {}).pop(lease, None)
            out.append(ScopeState(self._get(f"{b}:r:{minute}"), tokens, self._get(f"{b}:d:{day}", 0.0),
                                  self._get(f"{b}:m:{month}", 0.0)))
        return out


def month_end_s(now: float) -> float:
    """Seconds until the next UTC calendar month starts."""
    t = time.gmtime(now)
    days = calendar.monthrange(t.tm_year, t.tm_mon)[1]
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    return start + days * 86400 - now


def build_store(config: GatewayConfig, on_error: Callable[[str, BaseException], None]) -> Store:
    """Redis when config names a URL; otherwise the in-process backend (cache and limits of one process)."""
    r = config.features.redis
    if r.url:
        return RedisStore(r.url, r.key_prefix, r.timeout_s, r.down_for_s, r.ledger_stream, r.ledger_maxlen, on_error,
                          config.features.ledger.usage_days)
    return InMemoryStore(config.features.cache.max_entries, config.features.cache.max_bytes)
