"""Fair queue per deployment: when it is saturated, requests wait per tenant and leave by weighted fair share.

Saturated means this worker has `max_concurrency` requests in flight on the deployment, or vLLM reports
more waiting requests or a fuller KV cache than the operator's bound (fair_queue.max_waiting /
max_kv_cache). While saturated nothing is sent; each time a slot frees, the next request is chosen:

1. the best priority band first (the lowest vLLM `priority` among the waiting requests: interactive
   before batch, as vLLM itself schedules; with `priority_slots`, a request better than one in flight may
   also take one of that many extra slots, as the engine will run it first anyway), then
2. within the band, the tenant with the fewest tokens served recently per unit of weight, where served
   tokens are prompt + output bound charged when a request is released, corrected to vLLM's usage when it
   ends, and decayed with time constant `window_s` (so a tenant idle for a while has no debt, and a
   newcomer is served at once); then
3. first come, first served within the tenant.

This is weighted fair queuing over a decayed usage (like the "fair share" of batch schedulers such as
Slurm's, and llm-d's flow control per tenant) rather than over arrivals: a tenant that floods long prompts
gets its share of tokens, not its share of requests. Engine saturation is judged from a scraped figure
that lags: while it says "over", a request is let through only when one of ours finishes (in flight stays
where it was), so a stale scrape never stops the deployment.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import FairQueueSpec
from gateway.routing.live import DeploymentLive

RECHECK_S = 0.25  # a waiting request re-checks an engine-bound saturation this often (scrapes are periodic)


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place: queued, then holding a slot until `release`."""

    tenant: str
    priority: int
    cost: float  # tokens charged to the tenant when released (prompt bound + output bound)
    seq: int = 0
    future: asyncio.Future[None] | None = None
    granted: bool = False
    charged: float = 0.0


@dataclass(slots=True)
class _Usage:
    tokens: float = 0.0
    at: float = 0.0


@dataclass
class FairQueue:
    """One deployment's slots and waiting requests (this worker's view)."""

    name: str
    limit: int  # the deployment's max_concurrency
    spec: FairQueueSpec
    weight_of: Callable[[str], float]
    live: DeploymentLive | None = None
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    waiting: dict[tuple[int, str], deque[Ticket]] = field(default_factory=dict)  # (priority, tenant) -> FIFO
    served: dict[str, _Usage] = field(default_factory=dict)
    held: int | None = None  # in flight when the engine's figures first said "over" (see module doc)
    priorities: dict[int, int] = field(default_factory=dict)  # requests in flight by priority
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    on_change: Callable[[FairQueue], None] | None = None

    # ------------------------------------------------------------ state
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def queued_ahead(self, priority: int) -> int:
        """Requests waiting that a new request of this priority would wait behind (its band and better)."""
        return sum(len(q) for (p, _), q in self.waiting.items() if p <= priority)

    def engine_over(self) -> bool:
        live = self.live
        if live is None or not live.scraped:
            return False
        s = self.spec
        return (s.max_waiting is not None and live.waiting > s.max_waiting) or \
            (s.max_kv_cache is not None and live.kv_cache > s.max_kv_cache)

    def saturated(self) -> bool:
        if self.engine_over():
            if self.held is None:
                self.held = max(1, self.in_flight)
        else:
            self.held = None
        cap = self.limit if self.held is None else min(self.limit, self.held)
        return self.in_flight >= cap

    def may_start(self, priority: int) -> bool:
        """A slot is free, or one of the `priority_slots` extra ones for a request that the engine will run
        ahead of one already in flight (so it does not wait for a slot held by lower-priority work)."""
        if not self.saturated():
            return True
        extra = self.spec.priority_slots
        if not extra or not self.priorities:
            return False
        cap = self.limit if self.held is None else min(self.limit, self.held)
        return self.in_flight < cap + extra and priority < max(self.priorities)

    def share(self, tenant: str, now: float | None = None) -> float:
        """The tenant's decayed served tokens per unit of weight (what the release order compares)."""
        u = self.served.get(tenant)
        if u is None:
            return 0.0
        now = self.clock() if now is None else now
        return u.tokens * math.exp(-(now - u.at) / self.spec.window_s) / self.weight_of(tenant)

    def correct(self, tenant: str, tokens: float) -> None:
        """A served request's charge was its bound: add the difference to what vLLM reported doing."""
        if tokens:
            self._charge(tenant, tokens)

    def _charge(self, tenant: str, tokens: float) -> None:
        now = self.clock()
        u = self.served.setdefault(tenant, _Usage(0.0, now))
        u.tokens = max(0.0, u.tokens * math.exp(-(now - u.at) / self.spec.window_s) + tokens)
        u.at = now

    # ------------------------------------------------------------ slots
    def _grant(self, t: Ticket) -> None:
        self.in_flight += 1
        self.priorities[t.priority] = self.priorities.get(t.priority, 0) + 1
        t.granted = True
        t.charged = t.cost
        self._charge(t.tenant, t.cost)

    async def acquire(self, t: Ticket) -> bool:
        """Wait for a slot (the caller bounds the wait with a timeout); True if the request had to wait."""
        if self.queued_ahead(t.priority) == 0 and self.may_start(t.priority):
            self._grant(t)
            return False
        loop = asyncio.get_running_loop()
        t.seq, t.future = next(self._seq), loop.create_future()
        self.waiting.setdefault((t.priority, t.tenant), deque()).append(t)
        self._changed()
        try:
            self.pump()
            while not t.future.done():
                try:
                    await asyncio.wait_for(asyncio.shield(t.future), RECHECK_S)
                except TimeoutError:
                    self.pump()  # the engine's figures may have changed since the last release
        except BaseException:  # timed out or cancelled: leave the queue, or give back a slot granted meanwhile
            if t.granted:
                self.release(t, 0)
            else:
                self._remove(t)
            raise
        return True

    def _remove(self, t: Ticket) -> None:
        key = (t.priority, t.tenant)
        q = self.waiting.get(key)
        if q is not None and t in q:
            q.remove(t)
            if not q:
                del self.waiting[key]
            self._changed()

    def next_ticket(self) -> Ticket | None:
        """The request to release next: best band, then least share per weight, then arrival."""
        if not self.waiting:
            return None
        now = self.clock()
        key = min(self.waiting, key=lambda k: (k[0], self.share(k[1], now), self.waiting[k][0].seq))
        return self.waiting[key][0]

    def pump(self) -> None:
        while self.waiting:
            t = self.next_ticket()
            assert t is not None and t.future is not None
            if not self.may_start(t.priority):
                return
            self._remove(t)
            self._grant(t)
            if not t.future.done():
                t.future.set_result(None)

    def release(self, t: Ticket, used_tokens: int | None) -> None:
        """The request ended: its slot frees, and its charge becomes what vLLM did (None: keep the bound)."""
        if not t.granted:
            return
        t.granted = False
        self.in_flight -= 1
        left = self.priorities[t.priority] - 1
        if left:
            self.priorities[t.priority] = left
        else:
            del self.priorities[t.priority]
        if used_tokens is not None and used_tokens != t.charged:
            self._charge(t.tenant, used_tokens - t.charged)
        self.pump()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


def build_queues(deployments: dict[str, tuple[int, FairQueueSpec]], weight_of: Callable[[str], float],
                 live: Callable[[str], DeploymentLive | None]) -> dict[str, FairQueue]:
    """A fair queue for each deployment that declares one (name -> (max_concurrency, spec))."""
    return {name: FairQueue(name, limit, spec, weight_of, live(name)) for name, (limit, spec) in deployments.items()}
