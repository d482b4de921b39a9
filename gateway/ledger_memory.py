"""The ledger kept in this process only (`ledger.path: memory`): recent records within a byte budget, plus usage sums.

For a gateway without Redis and without a writable disk. The records ring drops the oldest beyond
`memory_bytes`; the usage aggregates keep every (tenant, day, hour, model) for `usage_days`, a few
hundred bytes each, so neither grows with the number of requests served. Nothing survives a restart
and every `--workers` process has its own: the CLI refuses `--workers > 1` with it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence

from gateway import usage


class MemoryLedger:
    name = "memory"

    def __init__(self, max_bytes: int, usage_days: int) -> None:
        self.max_bytes = max_bytes
        self.usage_days = usage_days
        self.rows: deque[tuple[int, float, bytes]] = deque()  # (sequence, ts written, line)
        self.bytes = 0
        self.groups: usage.Groups = {}
        self._seq = itertools.count(1)
        self._applied: dict[str, int] = {}  # writer -> last batch applied (one writer here, kept for symmetry)
        self._oldest_day = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ledger_write(self, writer: str, seq: int, entries: Sequence[bytes], groups: usage.Groups) -> None:
        if self._applied.get(writer, 0) >= seq:
            return
        self._applied[writer] = seq
        now = time.time()
        for e in entries:
            self.rows.append((next(self._seq), now, e))
            self.bytes += len(e) + 64  # the tuple and its ints: what the entry costs beyond its bytes
        while self.bytes > self.max_bytes and self.rows:
            _, _, old = self.rows.popleft()
            self.bytes -= len(old) + 64
        for k, d in groups.items():
            g = self.groups.get(k)
            if g is None:
                self.groups[k] = dict(d)
            else:
                for c, v in d.items():
                    g[c] = g.get(c, 0) + v
        cutoff = usage.day_hour(now - self.usage_days * 86400)[0]
        if cutoff != self._oldest_day:  # once a day: forget aggregates older than usage_days
            self._oldest_day = cutoff
            for k in [k for k in self.groups if k[1] < cutoff]:
                del self.groups[k]

    async def ledger_read(self, cursor: str | None, start_ts: float | None,
                          count: int) -> tuple[list[bytes], str | None]:
        after = int(cursor) if cursor else 0
        earliest = None if start_ts is None or cursor else start_ts - 6 * 3600
        out: list[bytes] = []
        last = after
        for seq, ts, e in self.rows:
            if seq <= after or (earliest is not None and ts < earliest):
                continue
            out.append(e)
            last = seq
            if len(out) >= count:
                return out, str(last)
        return out, None

    async def usage_groups(self, tenant: str | None, lo_hour: int | None, hi_hour: int | None) -> usage.Groups:
        return {k: dict(g) for k, g in self.groups.items()
                if (tenant is None or k[0] == tenant) and usage.in_range(k[1], k[2], lo_hour, hi_hour)}
