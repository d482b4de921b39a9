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
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import GatewayConfig, Limits

log = logging.getLogger("gateway.store")

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
    async def ledger_append(self, entries: Sequence[bytes]) -> None: ...
    async def ledger_range(self, start: str, end: str, count: int) -> list[tuple[str, bytes]]: ...


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
        self.kv: dict[str, tuple[Any, float]] = {}  # key -> (value, expires at; 0 = never)
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.locks: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}
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

    def _get(self, k: str, default: Any = 0) -> Any:
        v = self.kv.get(k)
        if v is None or (v[1] and v[1] < time.time()):
            return default
        return v[0]

    def _add(self, k: str, delta: Any, ttl: float) -> Any:
        v = self.kv.get(k)
        if v is None or (v[1] and v[1] < time.time()):
            v = (0, time.time() + ttl)
        self.kv[k] = (v[0] + delta, v[1])
        return v[0] + delta

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
