"""Usage aggregates: per (tenant, UTC day, hour, model) integer counters folded from ledger records.

Every ledger backend (Redis hashes, SQLite rows, the in-process dict) keeps the same counters, updated
with each written batch, so `/v1/usage` reads a few aggregates instead of scanning the ledger. Money is
summed as integer pico-USD (1e-12 USD); a record without the integer field falls back to its float.
The finest grain is one UTC hour: a query's start is rounded down and its end up to whole hours.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

PICO = 10**12
# Counters kept per (tenant, day, hour, model); all integers.
COUNTERS = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
            "cache_hit_prompt_tokens", "cache_hit_completion_tokens", "cost_pico_usd", "saved_pico_usd",
            "wasted_cost_pico_usd", "wasted_prompt_tokens", "wasted_completion_tokens", "fanout_prompt_tokens",
            "prefix_saved_pico_usd")
_PASSED_THROUGH = ("wasted_cost_pico_usd", "wasted_prompt_tokens", "wasted_completion_tokens",
                   "fanout_prompt_tokens", "prefix_saved_pico_usd")

Key = tuple[str, int, int, str]  # tenant, day (yyyymmdd), hour (0-23), model
Groups = dict[Key, dict[str, int]]


def _int(r: Mapping[str, Any], field: str) -> int:
    v = r.get(field)
    return int(v) if isinstance(v, int | float) and math.isfinite(v) else 0


def _pico(r: Mapping[str, Any], field: str) -> int:
    """An integer money field, or its float USD twin (cost_pico_usd <- cost_usd) in older records."""
    v = r.get(field)
    if isinstance(v, int):
        return v
    usd = r.get(field.replace("_pico_usd", "_usd"))
    return round(usd * PICO) if isinstance(usd, int | float) and math.isfinite(usd) else 0


def day_hour(ts: float) -> tuple[int, int]:
    t = time.gmtime(ts)
    return t.tm_year * 10000 + t.tm_mon * 100 + t.tm_mday, t.tm_hour


_DAY_HOUR: dict[int, tuple[int, int]] = {}  # hours since epoch -> (yyyymmdd, hour); a batch spans one or two


def key_of(r: Mapping[str, Any]) -> Key:
    ts = r.get("ts")
    h = int((ts if isinstance(ts, int | float) and math.isfinite(ts) else time.time()) // 3600)
    dh = _DAY_HOUR.get(h)
    if dh is None:
        if len(_DAY_HOUR) > 1000:
            _DAY_HOUR.clear()
        dh = _DAY_HOUR[h] = day_hour(h * 3600)
    model = r.get("served_model") or r.get("requested_model") or "_unknown"
    return str(r.get("tenant") or "unauthenticated"), dh[0], dh[1], str(model)


def add(g: dict[str, int], r: Mapping[str, Any]) -> None:
    """Add one record to its group's counters. Tokens served from the gateway's cache are counted apart:
    prompt/completion tokens are what vLLM processed (they match its own counters)."""
    g["requests"] += 1
    status = r.get("status")
    if isinstance(status, int) and status >= 400:
        g["errors"] += 1
    if r.get("cache") == "hit":
        g["cache_hits"] += 1
        g["cache_hit_prompt_tokens"] += _int(r, "prompt_tokens")
        g["cache_hit_completion_tokens"] += _int(r, "completion_tokens")
    else:
        g["prompt_tokens"] += _int(r, "prompt_tokens")
        g["completion_tokens"] += _int(r, "completion_tokens")
        g["cached_prompt_tokens"] += _int(r, "cached_tokens")
    g["cost_pico_usd"] += _pico(r, "cost_pico_usd")
    g["saved_pico_usd"] += _pico(r, "saved_pico_usd")
    for f in _PASSED_THROUGH:
        if f in r:
            g[f] += _int(r, f)


def deltas(r: Mapping[str, Any]) -> dict[str, int]:
    """What one record adds."""
    d = dict.fromkeys(COUNTERS, 0)
    add(d, r)
    return d


def fold(records: Iterable[Mapping[str, Any]], into: Groups | None = None) -> Groups:
    """Sum records into their (tenant, day, hour, model) groups."""
    groups: Groups = {} if into is None else into
    for r in records:
        k = key_of(r)
        g = groups.get(k)
        if g is None:
            g = groups[k] = dict.fromkeys(COUNTERS, 0)
        add(g, r)
    return groups


def hour_bounds(start_ts: float | None, end_ts: float | None) -> tuple[int | None, int | None]:
    """The query rounded outward to whole UTC hours: (first hour, hour after the last), in hours since epoch."""
    lo = None if start_ts is None else math.floor(start_ts / 3600)
    hi = None if end_ts is None else math.ceil(end_ts / 3600)
    return lo, hi


def hour_index(day: int, hour: int) -> int:
    """Hours since the epoch of (yyyymmdd, hour)."""
    return calendar.timegm((day // 10000, day // 100 % 100, day % 100, hour, 0, 0)) // 3600


def days_in(lo_hour: int, hi_hour: int) -> list[int]:
    """The UTC days (yyyymmdd) touched by hours [lo_hour, hi_hour)."""
    out: list[int] = []
    h = lo_hour - lo_hour % 24
    while h < hi_hour:
        out.append(day_hour(h * 3600)[0])
        h += 24
    return out


def iso_day(day: int) -> str:
    return f"{day // 10000:04d}-{day // 100 % 100:02d}-{day % 100:02d}"


def in_range(day: int, hour: int, lo: int | None, hi: int | None) -> bool:
    if lo is None and hi is None:
        return True
    i = hour_index(day, hour)
    return (lo is None or i >= lo) and (hi is None or i < hi)


def response(groups: Groups, tenant: str | None, start_ts: float | None, end_ts: float | None) -> dict[str, Any]:
    """The /v1/usage body: one row per (day, tenant, model) in the query's whole hours, and the totals."""
    lo, hi = hour_bounds(start_ts, end_ts)
    rows: dict[tuple[int, str, str], dict[str, int]] = {}
    for (t, day, hour, model), g in groups.items():
        if tenant is not None and t != tenant:
            continue
        if not in_range(day, hour, lo, hi):
            continue
        row = rows.setdefault((day, t, model), dict.fromkeys(COUNTERS, 0))
        for c in COUNTERS:
            row[c] += g.get(c, 0)
    data = [_present(row, {"tenant": t, "model": model, "day": iso_day(day)})
            for (day, t, model), row in sorted(rows.items())]
    totals = dict.fromkeys(COUNTERS, 0)
    for row in rows.values():
        for c in COUNTERS:
            totals[c] += row[c]
    return {"object": "usage", "tenant": tenant, "start": start_ts, "end": end_ts,
            "covered_start": None if lo is None else lo * 3600, "covered_end": None if hi is None else hi * 3600,
            "granularity": "hour", "data": data, "totals": _present(totals, {})}


def _present(counters: dict[str, int], head: dict[str, Any]) -> dict[str, Any]:
    out = {**head, **counters}
    out["cost_usd"] = counters["cost_pico_usd"] / PICO  # display only; sum the integer fields
    out["saved_usd"] = counters["saved_pico_usd"] / PICO
    return out
