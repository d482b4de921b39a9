"""Circuit breaker per deployment: closed -> open on failures -> half-open probes after a cool-down."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from gateway.config import CircuitBreakerSpec


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures, or a failure ratio over `min_requests` in the window."""

    def __init__(self, name: str, spec: CircuitBreakerSpec,
                 on_change: Callable[[str, BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.spec = spec
        self.state = BreakerState.CLOSED
        self._on_change = on_change
        self._clock = clock
        self._events: deque[tuple[float, bool]] = deque()
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes = 0

    def allow(self) -> bool:
        """May a request be sent now? In half-open state only a limited number of probes pass."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.spec.cooldown_s:
                return False
            self._set(BreakerState.HALF_OPEN)
            self._probes = 0
        if self._probes < self.spec.half_open_probes:
            self._probes += 1
            return True
        return False

    def settle(self, verdict: bool | None) -> None:
        """An attempt ended: True/False is what it says of the deployment; None (it never reached the
        deployment, or failed for the gateway's own reasons) gives back the probe slot it may hold."""
        if verdict is None:
            if self.state is BreakerState.HALF_OPEN and self._probes > 0:
                self._probes -= 1
            return
        self.record(verdict)

    def record(self, ok: bool) -> None:
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            if ok:
                self._events.clear()
                self._consecutive = 0
                self._set(BreakerState.CLOSED)
            else:
                self._open(now)
            return
        self._events.append((now, ok))
        horizon = now - self.spec.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
        self._consecutive = 0 if ok else self._consecutive + 1
        if self.state is BreakerState.CLOSED and not ok:
            failed = sum(1 for _, good in self._events if not good)
            if self._consecutive >= self.spec.failures or (
                    len(self._events) >= self.spec.min_requests
                    and failed / len(self._events) >= self.spec.failure_ratio):
                self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)
