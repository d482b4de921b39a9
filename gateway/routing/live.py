"""Live figures per deployment: vLLM's queue and KV-cache (scraped from its /metrics) and recent latencies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig

log = logging.getLogger("gateway.routing.live")

EWMA_WEIGHT = 0.2  # weight of the newest sample


@dataclass(slots=True)
class DeploymentLive:
    waiting: float = 0.0
    running: float = 0.0
    kv_cache: float = 0.0
    scraped: bool = False
    max_model_len: int | None = None
    ttft_s: float | None = None  # EWMA of the gateway-observed time to first token
    tpot_s: float | None = None  # EWMA of the time per output token

    def observe(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft_s = ttft_s if self.ttft_s is None else self.ttft_s + EWMA_WEIGHT * (ttft_s - self.ttft_s)
        if tpot_s is not None:
            self.tpot_s = tpot_s if self.tpot_s is None else self.tpot_s + EWMA_WEIGHT * (tpot_s - self.tpot_s)

    def predict_s(self, max_tokens: int) -> float | None:
        """Expected latency of a new request: a first token delayed by the queue, then max_tokens more.

        vLLM schedules waiting requests before a new one, so the first token is expected to take
        ttft * (1 + waiting / max(1, running)): each batch's worth of queued requests costs one more ttft.
        """
        if self.ttft_s is None or self.tpot_s is None:
            return None
        queue_factor = 1.0 + self.waiting / max(1.0, self.running)
        return self.ttft_s * queue_factor + self.tpot_s * max(0, max_tokens - 1)


VLLM_GAUGES = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
               "vllm:kv_cache_usage_perc": "kv_cache", "vllm:gpu_cache_usage_perc": "kv_cache"}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = VLLM_GAUGES.get(family.name)
        if field is None:
            continue
        values = [s.value for s in family.samples if s.name == family.name]
        if values:
            out[field] = max(values) if field == "kv_cache" else sum(values)
    return out


class LiveStats:
    """Scrapes every deployment's vLLM /metrics every few seconds (once per server URL)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.by_deployment = {d.name: DeploymentLive() for m in config.models.values() for d in m.deployments}
        self._urls: dict[str, list[str]] = {}
        self._upstream_names: dict[str, str] = {}
        for m in config.models.values():
            for d in m.deployments:
                self._urls.setdefault(d.url, []).append(d.name)
                self._upstream_names[d.name] = d.upstream_model
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self, deployment: str) -> DeploymentLive:
        return self.by_deployment[deployment]

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._loop(), name="vllm-metrics-scrape")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self.config.metrics_scrape_interval)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self._scrape(url, names) for url, names in self._urls.items()))

    async def _scrape(self, url: str, names: list[str]) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with self._session.get(f"{url}/metrics", timeout=timeout) as r:
                text = await r.text() if r.status == 200 else ""
            figures = parse_vllm_metrics(text)
            if any(self.by_deployment[n].max_model_len is None for n in names):
                async with self._session.get(f"{url}/v1/models", timeout=timeout) as r:
                    models = (await r.json()).get("data", []) if r.status == 200 else []
                lens = {m.get("id"): m.get("max_model_len") for m in models if isinstance(m, dict)}
                for n in names:
                    got = lens.get(self._upstream_names[n])
                    if isinstance(got, int):
                        self.by_deployment[n].max_model_len = got
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            log.debug("scrape of %s failed: %s", url, type(e).__name__)
            return
        for n in names:
            live = self.by_deployment[n]
            live.waiting = figures.get("waiting", 0.0)
            live.running = figures.get("running", 0.0)
            live.kv_cache = figures.get("kv_cache", 0.0)
            live.scraped = bool(figures)
