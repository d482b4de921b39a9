"""Limit state in the store: sliding-window, idempotent admit/settle as Redis Lua scripts and in one process.

Every key of one script call carries the tenant's hash tag (`{p}{t:TENANT}:rl:...`), so the scripts run on
a Redis Cluster too: KEYS are the admission's marker and each scope's base key, and the scripts derive
the rest from those bases (same tag, same slot). See docs/redis.md for the layout.

- rpm: a sorted set of admissions scored by Redis `TIME` (ms); an admission is counted while it is
  younger than 60 s, so no 60 s span ever holds more than `rpm` (no fixed minute edges).
- tpm: a sorted set of `lease:tokens` members, scored the same way, plus their running total;
  settle replaces the reservation's member by the real usage.
- concurrency: a sorted set of leases scored by their expiry.
- budgets: integer pico-USD per UTC day / month (INCRBY: exact).
- The marker `{tag}:rl:q:LEASE` makes both scripts idempotent: admit records the reservation in it
  (a repeated admit changes nothing), settle turns it into a tombstone (a repeated settle changes
  nothing, and an admit that Redis runs only after its settle - a command queued during a stall - is
  refused). A settle without marker (the admit never ran) counts the real usage it reports.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config import Limits

WINDOW_MS = 60_000
MARKER_EXTRA_MS = 86_400_000  # an admission's marker outlives its lease by a day: no request runs longer
TOMBSTONE_MS = 60_000  # a late admit runs within moments of Redis answering again; the settle's mark outlives it
# A settle that failed once is retried (and maybe spooled, then replayed after a restart): its tombstone is
# kept this long, so that a replay after a crash between the Redis write and the spool's delete changes nothing.
SETTLE_REPLAY_MS = 7 * 86_400_000


@dataclass(frozen=True, slots=True)
class Scope:
    """One scope a request counts against: a tenant or an API key (within its tenant's hash tag)."""

    base: str  # e.g. "gw:{t:team-a}:rl:t" or "gw:{t:team-a}:rl:k:0123456789ab"
    tag: str  # e.g. "gw:{t:team-a}": every key of the request's scopes starts with it (one Cluster slot)
    limits: Limits
    tenant: str | None = None  # set for tenant scopes (spend gauges, budget pressure)
    budget_day: int = 0  # pico-USD; 0 = none
    budget_month: int = 0

    @property
    def flags(self) -> str:
        lim = self.limits
        return ("r" if lim.rpm else "") + ("t" if lim.tpm else "") + \
            ("b" if self.budget_day or self.budget_month else "") + ("c" if lim.concurrency else "")


@dataclass(slots=True)
class ScopeState:
    """Counters of one scope after admit/settle: what the headers and gauges report."""

    requests: int = 0  # in the last 60 s
    tokens: int = 0  # in the last 60 s
    spend_day: int = 0  # pico-USD
    spend_month: int = 0
    reset_ms: int = 0  # until the oldest counted admission leaves the window


@dataclass(frozen=True, slots=True)
class Admission:
    lease: str  # unique per admission (made by the gateway, never the client's request id)
    tokens: int
    cost: int  # pico-USD
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Settlement:
    lease: str
    reserved_tokens: int
    reserved_cost: int
    tokens: int  # what the request really used (0 for a release)
    cost: int
    count_request: bool  # the request was served: count it in rpm if admit never did
    ttl_ms: int  # how long the tombstone outlives the settle


@dataclass(slots=True)
class AdmitResult:
    ok: bool
    states: list[ScopeState]
    refused_scope: int = -1
    refused_limit: str | None = None
    repeated: bool = False  # the marker existed: an earlier run of this admission decided

    @property
    def reset_s(self) -> int:
        st = self.states[self.refused_scope] if self.refused_scope >= 0 else None
        ms = st.reset_ms if st is not None else min((s.reset_ms for s in self.states if s.reset_ms), default=0)
        return max(1, -(-ms // 1000)) if ms else 60


def marker_key(scopes: Sequence[Scope], lease: str) -> str:
    tags = {s.tag for s in scopes}
    assert len(tags) == 1, "the scopes of one request share their tenant's hash tag"
    return scopes[0].tag + ":rl:q:" + lease


# ------------------------------------------------------------------------------------------------ Lua

_COMMON_LUA = """
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
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - 60000
local day, month = ymd(math.floor(sec / 86400))
local function keep(k, ms) if redis.call('PTTL', k) < ms then redis.call('PEXPIRE', k, ms) end end
local function spend(b)
  return redis.call('GET', b .. ':d:' .. day) or '0', redis.call('GET', b .. ':m:' .. month) or '0'
end
local function charge(b, d, m, pico)
  local dk, mk = b .. ':d:' .. d, b .. ':m:' .. m
  redis.call('INCRBY', dk, pico); redis.call('INCRBY', mk, pico)
  if redis.call('TTL', dk) < 0 then redis.call('EXPIRE', dk, 3 * 86400) end
  if redis.call('TTL', mk) < 0 then redis.call('EXPIRE', mk, 40 * 86400) end
end
-- drop token reservations older than the window from the log and its total; the total that is left
local function window_tokens(b)
  local tq, tt = b .. ':tq', b .. ':tt'
  while true do
    local old = redis.call('ZRANGEBYSCORE', tq, '-inf', cutoff, 'LIMIT', 0, 500)
    if #old == 0 then break end
    local sum = 0
    for _, m in ipairs(old) do sum = sum + tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREM', tq, unpack(old))
    redis.call('DECRBY', tt, string.format('%d', sum))
  end
  return tonumber(redis.call('GET', tt) or '0')
end
local function oldest(k)
  local o = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if #o == 0 then return 0 end
  return math.max(0, tonumber(o[2]) + 60000 - now)
end
local function log_tokens(b, ts, member, n)
  redis.call('ZADD', b .. ':tq', ts, member)
  redis.call('INCRBY', b .. ':tt', n)
  keep(b .. ':tq', 61000); keep(b .. ':tt', 61000)
end
"""

# KEYS[1]: the admission's marker; KEYS[1 + i]: scope i's base.  ARGV: lease, tokens, cost (pico), lease_ms,
# then 5 limits per scope (rpm, tpm, concurrency, budget_day pico, budget_month pico; 0 = none).
# Returns {ok, refused scope (1-based, 0 = none), refused limit, then per scope checked: requests, tokens,
# spend_day, spend_month (strings: exact integers), reset_ms}.
ADMIT_LUA = _COMMON_LUA + """
local mk, lease, tokens, cost, lease_ms = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local seen = redis.call('HGET', mk, 's')
if seen then return {seen == 'a' and 1 or 0, 0, seen == 'a' and 'repeated' or 'settled'} end
local out = {1, 0, ''}
local refused = nil
for i = 2, #KEYS do
  local b, o = KEYS[i], 4 + (i - 2) * 5
  local rpm, tpm, conc = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  local bd, bm = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
  local r, tk, reset, sd, sm = 0, 0, 0, '0', '0'
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', b .. ':rq', '-inf', cutoff)
    r = redis.call('ZCARD', b .. ':rq')
    reset = oldest(b .. ':rq')
  end
  if tpm > 0 then
    tk = window_tokens(b)
    reset = math.max(reset, oldest(b .. ':tq'))
  end
  if bd > 0 or bm > 0 then sd, sm = spend(b) end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', b .. ':c', '-inf', now)
    if redis.call('ZCARD', b .. ':c') >= conc then refused = 'concurrency' end
  end
  if not refused and rpm > 0 and r + 1 > rpm then refused = 'rpm' end
  if not refused and tpm > 0 and tk + tokens > tpm then refused = 'tpm' end
  if not refused and bd > 0 and (tonumber(sd) >= bd or tonumber(sd) + cost > bd) then refused = 'budget_day' end
  if not refused and bm > 0 and (tonumber(sm) >= bm or tonumber(sm) + cost > bm) then refused = 'budget_month' end
  for _, v in ipairs({r, tk, sd, sm, reset}) do table.insert(out, v) end
  if refused then
    out[1], out[2], out[3] = 0, i - 1, refused
    return out
  end
end
for i = 2, #KEYS do
  local b, o, at = KEYS[i], 4 + (i - 2) * 5, 4 + (i - 2) * 5
  if tonumber(ARGV[o + 1]) > 0 then
    redis.call('ZADD', b .. ':rq', now, lease); keep(b .. ':rq', 61000)
    out[at] = out[at] + 1
  end
  if tonumber(ARGV[o + 2]) > 0 then
    log_tokens(b, now, lease .. ':' .. ARGV[2], ARGV[2])
    out[at + 1] = out[at + 1] + tokens
  end
  if tonumber(ARGV[o + 4]) > 0 or tonumber(ARGV[o + 5]) > 0 then
    charge(b, day, month, ARGV[3])
    out[at + 2], out[at + 3] = spend(b)
  end
  if tonumber(ARGV[o + 3]) > 0 then
    redis.call('ZADD', b .. ':c', now + lease_ms, lease); keep(b .. ':c', lease_ms + 1000)
  end
end
redis.call('HSET', mk, 's', 'a', 'tk', ARGV[2], 'ts', now, 'd', day, 'm', month)
redis.call('PEXPIRE', mk, lease_ms + 86400000)  -- outlives any request: settle must find it
return out
"""

# KEYS as admit.  ARGV: lease, tokens, cost (pico), token delta, cost delta (real - reserved), count_request
# (1/0), tombstone ttl_ms, then per scope its flags (r rpm, t tpm, b budgets, c concurrency).
# Returns per scope: requests, tokens, spend_day, spend_month, 0.
SETTLE_LUA = _COMMON_LUA + """
local mk, lease = KEYS[1], ARGV[1]
local seen = redis.call('HGET', mk, 's')
local function has(flags, f) return string.find(flags, f, 1, true) ~= nil end
if seen == 'a' then
  local m = redis.call('HMGET', mk, 'tk', 'ts', 'd', 'm')
  for i = 2, #KEYS do
    local b, flags = KEYS[i], ARGV[6 + i]
    local old = lease .. ':' .. m[1]
    if has(flags, 't') and redis.call('ZSCORE', b .. ':tq', old) then
      redis.call('ZREM', b .. ':tq', old)
      if tonumber(ARGV[2]) > 0 then redis.call('ZADD', b .. ':tq', m[2], lease .. ':' .. ARGV[2]) end
      redis.call('INCRBY', b .. ':tt', ARGV[4])
    end
    if has(flags, 'b') and ARGV[5] ~= '0' then charge(b, m[3], m[4], ARGV[5]) end
    if has(flags, 'c') then redis.call('ZREM', b .. ':c', lease) end
  end
elseif not seen then
  for i = 2, #KEYS do
    local b, flags = KEYS[i], ARGV[6 + i]
    if has(flags, 'r') and ARGV[6] == '1' then
      redis.call('ZADD', b .. ':rq', now, lease); keep(b .. ':rq', 61000)
    end
    if has(flags, 't') and tonumber(ARGV[2]) > 0 then log_tokens(b, now, lease .. ':' .. ARGV[2], ARGV[2]) end
    if has(flags, 'b') and tonumber(ARGV[3]) > 0 then charge(b, day, month, ARGV[3]) end
  end
end
if seen ~= 'd' then
  redis.call('DEL', mk)
  redis.call('HSET', mk, 's', 'd')
  redis.call('PEXPIRE', mk, ARGV[7])
elseif redis.call('PTTL', mk) < tonumber(ARGV[7]) then
  redis.call('PEXPIRE', mk, ARGV[7])  -- a retried settle: its tombstone now outlives any replay of it
end
local out = {}
for i = 2, #KEYS do
  local b = KEYS[i]
  local sd, sm = spend(b)
  for _, v in ipairs({redis.call('ZCARD', b .. ':rq'), tonumber(redis.call('GET', b .. ':tt') or '0'), sd, sm, 0}) do
    table.insert(out, v)
  end
end
return out
"""


def admit_args(scopes: Sequence[Scope], a: Admission) -> list[str | int]:
    args: list[str | int] = [a.lease, a.tokens, a.cost, a.lease_ms]
    for s in scopes:
        lim = s.limits
        args += [lim.rpm, lim.tpm, lim.concurrency, s.budget_day, s.budget_month]
    return args


def settle_args(scopes: Sequence[Scope], s: Settlement) -> list[str | int]:
    return [s.lease, s.tokens, s.cost, s.tokens - s.reserved_tokens, s.cost - s.reserved_cost,
            1 if s.count_request else 0, s.ttl_ms, *(sc.flags for sc in scopes)]


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_states(flat: Sequence[object], n: int) -> list[ScopeState]:
    got = [ScopeState(int(_text(flat[i * 5])), int(_text(flat[i * 5 + 1])), int(_text(flat[i * 5 + 2])),
                      int(_text(flat[i * 5 + 3])), int(_text(flat[i * 5 + 4])))
           for i in range(len(flat) // 5)]
    return got + [ScopeState() for _ in range(n - len(got))]


def parse_admit(r: Sequence[object], n: int) -> AdmitResult:
    ok, refused_at, refused = int(_text(r[0])), int(_text(r[1])), _text(r[2])
    if refused in ("repeated", "settled"):
        return AdmitResult(bool(ok), [ScopeState() for _ in range(n)], -1,
                           None if ok else "settled", repeated=True)
    return AdmitResult(bool(ok), parse_states(r[3:], n), refused_at - 1, refused or None)


# ------------------------------------------------------------------------------------------------ in-process


@dataclass
class _ScopeLog:
    requests: deque[float] = field(default_factory=deque)  # admission times (ms)
    tokens: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)  # lease -> [ms, tokens]
    token_total: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # lease -> expiry (ms)


class MemoryLimits:
    """The same semantics as the scripts for one process (no tombstones needed: nothing runs late)."""

    def __init__(self) -> None:
        self.logs: dict[str, _ScopeLog] = {}
        self.spend: dict[str, int] = {}
        self.markers: dict[str, tuple[int, float, int, int, float]] = {}  # tokens, ms, day, month, expiry

    @staticmethod
    def _now() -> tuple[float, int, int]:
        now = time.time()
        t = time.gmtime(now)
        return now * 1000, t.tm_year * 10000 + t.tm_mon * 100 + t.tm_mday, t.tm_year * 100 + t.tm_mon

    def _trim(self, log: _ScopeLog, now: float) -> None:
        cutoff = now - WINDOW_MS
        while log.requests and log.requests[0] <= cutoff:
            log.requests.popleft()
        while log.tokens:
            lease, (ts, n) = next(iter(log.tokens.items()))
            if ts > cutoff:
                break
            del log.tokens[lease]
            log.token_total -= int(n)
        for lease in [k for k, exp in log.leases.items() if exp <= now]:
            del log.leases[lease]

    def _state(self, s: Scope, log: _ScopeLog, now: float, day: int, month: int) -> ScopeState:
        first = [log.requests[0]] if log.requests else []
        if log.tokens:
            first.append(next(iter(log.tokens.values()))[0])
        reset = int(max(0.0, min(first) + WINDOW_MS - now)) if first else 0
        return ScopeState(len(log.requests), log.token_total, self.spend.get(f"{s.base}:d:{day}", 0),
                          self.spend.get(f"{s.base}:m:{month}", 0), reset)

    def admit(self, scopes: Sequence[Scope], a: Admission) -> AdmitResult:
        now, day, month = self._now()
        if len(self.markers) > 10_000:
            self.markers = {k: v for k, v in self.markers.items() if v[4] > now}
        states = []
        for i, s in enumerate(scopes):
            lim, log = s.limits, self.logs.setdefault(s.base, _ScopeLog())
            self._trim(log, now)
            st = self._state(s, log, now, day, month)
            states.append(st)
            refused = None
            if lim.concurrency and len(log.leases) >= lim.concurrency:
                refused = "concurrency"
            elif lim.rpm and st.requests + 1 > lim.rpm:
                refused = "rpm"
            elif lim.tpm and st.tokens + a.tokens > lim.tpm:
                refused = "tpm"
            elif s.budget_day and (st.spend_day >= s.budget_day or st.spend_day + a.cost > s.budget_day):
                refused = "budget_day"
            elif s.budget_month and (st.spend_month >= s.budget_month or st.spend_month + a.cost > s.budget_month):
                refused = "budget_month"
            if refused:
                return AdmitResult(False, states, i, refused)
        for s, st in zip(scopes, states, strict=True):
            log = self.logs[s.base]
            if s.limits.rpm:
                log.requests.append(now)
                st.requests += 1
            if s.limits.tpm:
                log.tokens[a.lease] = [now, a.tokens]
                log.token_total += a.tokens
                st.tokens = log.token_total
            if s.budget_day or s.budget_month:
                st.spend_day = self._charge(f"{s.base}:d:{day}", a.cost)
                st.spend_month = self._charge(f"{s.base}:m:{month}", a.cost)
            if s.limits.concurrency:
                log.leases[a.lease] = now + a.lease_ms
        self.markers[a.lease] = (a.tokens, now, day, month, now + a.lease_ms + MARKER_EXTRA_MS)
        return AdmitResult(True, states)

    def _charge(self, key: str, pico: int) -> int:
        if key not in self.spend and len(self.spend) >= 2 * len(self.logs) + 16:
            self._forget_past_periods()
        self.spend[key] = self.spend.get(key, 0) + pico
        return self.spend[key]

    def _forget_past_periods(self) -> None:
        """Spend of past days and months is no longer checked: keep the map to the current periods."""
        _, day, month = self._now()
        self.spend = {k: v for k, v in self.spend.items() if k.endswith((f":d:{day}", f":m:{month}"))}

    def settle(self, scopes: Sequence[Scope], st: Settlement) -> list[ScopeState]:
        now, day, month = self._now()
        marker = self.markers.pop(st.lease, None)
        out = []
        for s in scopes:
            log = self.logs.setdefault(s.base, _ScopeLog())
            if marker is not None:
                entry = log.tokens.get(st.lease)
                if s.limits.tpm and entry is not None:
                    entry[1] = st.tokens
                    log.token_total += st.tokens - st.reserved_tokens
                if (s.budget_day or s.budget_month) and st.cost != st.reserved_cost:
                    self._charge(f"{s.base}:d:{marker[2]}", st.cost - st.reserved_cost)
                    self._charge(f"{s.base}:m:{marker[3]}", st.cost - st.reserved_cost)
                log.leases.pop(st.lease, None)
            else:  # never admitted (the store could not be asked): count what was used
                if s.limits.rpm and st.count_request:
                    log.requests.append(now)
                if s.limits.tpm and st.tokens > 0:
                    log.tokens[st.lease] = [now, st.tokens]
                    log.token_total += st.tokens
                if (s.budget_day or s.budget_month) and st.cost > 0:
                    self._charge(f"{s.base}:d:{day}", st.cost)
                    self._charge(f"{s.base}:m:{month}", st.cost)
            out.append(self._state(s, log, now, day, month))
        return out
