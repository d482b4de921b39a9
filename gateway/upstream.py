"""Connections to vLLM deployments: one pooled keep-alive HTTP client, per-deployment slots and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway.config import Deployment, GatewayConfig

log = logging.getLogger("gateway.upstream")


@dataclass(eq=False)
class DeploymentState:
    """Live state of one deployment in this worker."""

    spec: Deployment
    slots: asyncio.Semaphore
    timeout: aiohttp.ClientTimeout
    stream_timeout: aiohttp.ClientTimeout  # also bounds each read: a stream that stalls mid-way is cut off
    headers: dict[str, str]
    in_flight: int = 0  # requests sent and not finished (the busy clock's divisor)
    busy_share_s: float = 0.0  # the busy clock: grows by 1/in_flight per second while in_flight > 0
    busy_at: float = 0.0
    healthy: bool | None = None  # None until the first health check answers

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> float:
        return (self.in_flight + 1) / self.spec.weight

    def _tick(self, now: float) -> float:
        if self.in_flight:
            self.busy_share_s += (now - self.busy_at) / self.in_flight
        self.busy_at = now
        return self.busy_share_s

    def sent(self, now: float) -> float:
        """A request was sent: returns the busy clock's reading, which `finished` subtracts."""
        reading = self._tick(now)
        self.in_flight += 1
        return reading

    def finished(self, now: float, reading: float) -> float:
        """A request finished: its share of the busy time (seconds). Over any window, the shares of all
        requests add up to the time at least one request was in flight (processor sharing)."""
        share = self._tick(now) - reading
        self.in_flight -= 1
        return share


class UpstreamPool:
    """Owns the HTTP client session and the state of every deployment; checks /health periodically."""

    def __init__(self, config: GatewayConfig,
                 on_checked: Callable[[UpstreamPool], None] | None = None) -> None:
        self.config = config
        self._on_checked = on_checked
        self.states: dict[str, DeploymentState] = {}
        for model in config.models.values():
            for d in model.deployments:
                if d.name in self.states:
                    continue  # a catalogue adapter runs on its base model's deployments: one state per engine
                headers = {"Authorization": f"Bearer {d.api_key}"} if d.api_key else {}
                t = d.timeouts
                timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, connect=t.connect)
                stream_timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, connect=t.connect,
                                                       sock_read=t.first_token)
                self.states[d.name] = DeploymentState(d, asyncio.Semaphore(d.max_concurrency), timeout,
                                                      stream_timeout, headers)
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamPool.start() was not awaited"
        return self._session

    async def start(self) -> None:
        # Idle pooled connections are dropped after 4 s, before vLLM's uvicorn drops them (5 s): reusing one
        # the server is closing would fail the request.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4, ttl_dns_cache=300)
        # auto_decompress off: bodies are relayed byte for byte; no cookie jar: the gateway is stateless.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._session is not None:
            await self._session.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.health_interval)
            await self.check_all()

    async def check_all(self) -> None:
        # Several deployments may share one vLLM server (base model and its adapters): ask each URL once.
        by_url: dict[str, list[DeploymentState]] = {}
        for s in self.states.values():
            by_url.setdefault(s.spec.url, []).append(s)
        results = await asyncio.gather(*(self._check(url, group[0]) for url, group in by_url.items()))
        for group, (ok, err) in zip(by_url.values(), results, strict=True):
            for s in group:
                if s.healthy is not ok:
                    log.log(logging.INFO if ok else logging.WARNING, "deployment %s is %s%s", s.name,
                            "healthy" if ok else "unhealthy", f": {err}" if err else "")
                s.healthy = ok
        if self._on_checked is not None:
            self._on_checked(self)

    async def _check(self, url: str, state: DeploymentState) -> tuple[bool, str | None]:
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(5.0, state.spec.timeouts.connect * 2)))
        try:
            async with self.session.get(f"{url}/health", timeout=timeout, headers=state.headers) as r:
                await r.read()
                return r.status == 200, None if r.status == 200 else f"HTTP {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return False, type(e).__name__

    def ready_models(self) -> dict[str, bool]:
        return {name: any(self.states[d.name].healthy for d in m.deployments)
                for name, m in self.config.models.items()}
