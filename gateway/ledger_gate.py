"""Ledger before the last byte: a response ends only once its ledger record is in the shared store or the spool.

The ledger buffers finished records and writes them in batches (gateway/ledger.py). A replica that
dies (SIGKILL, OOM kill, node loss) between answering a client and that write would lose the record
of a request the client saw finish. The gate closes that window: before the final bytes of a
response, `wait()` drains the ledger's buffer into the store. Requests finishing together share one
write (group commit: one drain covers every record appended before it ends), so the cost is one Redis
round trip of latency per response, not one write per request.

While the store fails, waiting on it would only add its timeout to every response: the gate then
writes the buffer to the local spool instead (gateway/spool.py: one fsync, shared by the responses
finishing together) for `skip_s`, and the ledger's own loop probes Redis and replays the spool when it
answers. The request's pending limit settle (its budget charge) goes to the spool the same way
(`settles`). Without a spool (`ledger.spool_path: off`) the records wait in memory during that window,
and a replica killed then loses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.ledger import Ledger
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.ledger")


class LedgerGate:
    def __init__(self, ledger: Ledger, max_wait_s: float, skip_s: float,
                 settles: Callable[[], Awaitable[None]] | None = None) -> None:
        self.ledger = ledger
        self.max_wait_s = max_wait_s
        self.skip_s = skip_s
        self.settles = settles  # makes the limiter's settles that Redis did not take durable (the spool)
        self._skip_until = 0.0
        self._logged = -60.0
        self._drain: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        """Return once every record appended so far is written or spooled, or max_wait_s passed."""
        target = self.ledger.appended  # this response's record is among these
        if time.monotonic() < self._skip_until:  # the store is failing: local disk instead
            await self._spool(target)
            return
        if self.ledger.done >= target:
            return
        try:
            async with asyncio.timeout(self.max_wait_s):
                while self.ledger.done < target and time.monotonic() >= self._skip_until:
                    if self._drain is None or self._drain.done():
                        # a drain takes every record appended before it ends, ours included
                        self._drain = asyncio.ensure_future(self._drain_buffer())
                    # shield: a client that leaves must not cancel the write other responses wait for
                    await asyncio.shield(self._drain)
        except TimeoutError:
            self._skip(f"ledger write took longer than {self.max_wait_s:g} s")
        if self.ledger.done < target or time.monotonic() < self._skip_until:
            await self._spool(target)

    async def _spool(self, target: int) -> None:
        if self.ledger.spool is None:
            return
        if self.ledger.done < target:
            await self.ledger.spill()  # shielded inside; waits for a write in flight to end first
        if self.settles is not None:
            await asyncio.shield(asyncio.ensure_future(self.settles()))

    async def _drain_buffer(self) -> None:
        try:
            await self.ledger.flush()  # drains until empty: records appended meanwhile are included
        except StoreUnavailable as e:
            self._skip(str(e))

    def _skip(self, why: str) -> None:
        now = time.monotonic()
        if now >= self._skip_until and now - self._logged >= 10.0:  # an outage: one line per 10 s
            self._logged = now
            how = "into the spool" if self.ledger.spool is not None else "while their records wait in memory"
            log.warning("responses go out with their ledger record written %s (for %.1f s, then Redis is tried "
                        "again): %s", how, self.skip_s, why)
        self._skip_until = now + self.skip_s
