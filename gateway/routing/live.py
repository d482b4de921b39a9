"""Live figures per deployment: vLLM queue, KV cache and prefix cache (scraped from /metrics), recent latencies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
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
    # vLLM's prefix cache: cumulative token counters as last scraped, and the hit rate of the last interval
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    prefix_hit_rate: float | None = None
    kv_capacity_tokens: int | None = None  # num_gpu_blocks * block_size from vllm:cache_config_info

    def update_prefix(self, hits: float, queries: float) -> tuple[float, float, bool]:
        """Take new cumulative counters; return the deltas and whether the counters were reset (restart)."""
        reset = self.prefix_hits is not None and (hits < self.prefix_hits or queries < (self.prefix_queries or 0))
        if self.prefix_hits is None:  # first sight: the counters hold the engine's history, not a delta
            d_hits = d_queries = 0.0
        elif reset:  # counting again from zero since the restart
            d_hits, d_queries = hits, queries
        else:
            d_hits, d_queries = hits - self.prefix_hits, queries - (self.prefix_queries or 0.0)
        self.prefix_hits, self.prefix_queries = hits, queries
        if d_queries > 0:
            self.prefix_hit_rate = d_hits / d_queries
        return d_hits, d_queries, reset

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
# prefix-cache token counters (vLLM V1 names, then V0's), summed over the engine's model_name labels
VLLM_COUNTERS = {"vllm:prefix_cache_hits": "prefix_hits", "vllm:prefix_cache_queries": "prefix_queries",
                 "vllm:gpu_prefix_cache_hits": "prefix_hits", "vllm:gpu_prefix_cache_queries": "prefix_queries"}

PrefixListener = Callable[[str, DeploymentLive, float, float, bool], None]  # (deployment, live, hits, queries, reset)


def parse_vllm_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            for s in family.samples:
                blocks, size = s.labels.get("num_gpu_blocks", ""), s.labels.get("block_size", "")
                if blocks.isdigit() and size.isdigit():
                    out["kv_capacity_tokens"] = float(int(blocks) * int(size))
            continue
        base = family.name.removesuffix("_total")  # untyped exposition keeps the suffix in the family name
        counter = VLLM_COUNTERS.get(base)
        if counter is not None:
            total = [s.value for s in family.samples if s.name == base + "_total"]
            if total and counter not in out:
                out[counter] = sum(total)
            continue
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
                if d.name in self._upstream_names:
                    continue  # a catalogue adapter's deployments are its base model's
                self._urls.setdefault(d.url, []).append(d.name)
                self._upstream_names[d.name] = d.upstream_model
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.prefix_listeners: list[PrefixListener] = []  # e.g. the prefix balancer checking its index

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
            if "kv_capacity_tokens" in figures:
                live.kv_capacity_tokens = int(figures["kv_capacity_tokens"])
            if "prefix_hits" in figures and "prefix_queries" in figures:
                d_hits, d_queries, reset = live.update_prefix(figures["prefix_hits"], figures["prefix_queries"])
                for listener in self.prefix_listeners:
                    listener(n, live, d_hits, d_queries, reset)
