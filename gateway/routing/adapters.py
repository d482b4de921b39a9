"""LoRA adapters loaded on demand: which engine holds which catalogue adapter, loads, evictions, re-sync.

The config lists adapters (`adapters:`) without pinning them to engines; each deployment declares how
many it may hold (`adapter_slots`). A request for an adapter goes to an engine that holds it; if none
does, it is loaded (vLLM's `POST /v1/load_lora_adapter`, the engine started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) onto an engine with a free slot, or in place of the least
recently used adapter there that has no request in flight (`POST /v1/unload_lora_adapter`). One load per
(engine, adapter) at a time: concurrent requests for a cold adapter wait for the same load. A hot adapter
(every holder has `replicate_in_flight` requests of it in flight) is loaded onto one more engine that has a
free slot. What each engine holds is re-read from its `/v1/models` when it comes back healthy, every
`sync_interval_s`, and when it answers 404 for an adapter the gateway thought it held (then the adapter is
reloaded and the request sent again, once). docs/routing.md, "LoRA adapters on demand", has the rules.

The view is per gateway worker. Workers (and replicas) sharing engines learn each other's loads from
vLLM ("already loaded" is taken as loaded, /v1/models is re-read) and each other's unloads from the 404.
In vLLM 0.32 an unload only removes the name from the server's table (running requests keep their LoRA
request), so a worker that unloads what another worker's request is using costs that worker a reload,
not a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway import errors
from gateway.config import Adapter, AdapterPlacementSpec, GatewayConfig, Model
from gateway.errors import GatewayError
from gateway.money import PICO
from gateway.upstream_errors import Retryable, error_message, json_or_none

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.record import RequestRecord
    from gateway.upstream import DeploymentState, UpstreamPool

log = logging.getLogger("gateway.adapters")
JSON = {"Content-Type": "application/json"}
# How an engine says it cannot take one more adapter (vLLM 0.32 itself never refuses: it evicts from its
# own CPU cache; other servers and versions answer so when their adapter slots are full).
_FULL_WORDS = ("slots are full", "maximum number of lora", "max_loras", "capacity", "too many lora")


@dataclass(slots=True)
class Held:
    """One adapter on one engine."""

    in_flight: int = 0  # requests holding it (never evicted while > 0)
    last_used: float = 0.0  # monotonic; 0: adopted from the engine, never used by this worker
    since: float = field(default_factory=time.monotonic)  # when this worker learnt the engine holds it


@dataclass(eq=False)
class Engine:
    """One deployment that may hold adapters, as this worker believes it to be."""

    state: DeploymentState
    slots: int
    held: dict[str, Held] = field(default_factory=dict)
    loading: dict[str, asyncio.Task[float]] = field(default_factory=dict)  # single flight per adapter
    unloading: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)  # held once, then gone from the engine (a restart): "reload"
    waiting: dict[str, int] = field(default_factory=dict)  # requests waiting for a load: it is not evicted
    # between the load's end and their taking it
    freed: asyncio.Event = field(default_factory=asyncio.Event)  # set (then replaced) when a slot may be free
    synced: bool = False

    @property
    def name(self) -> str:
        return self.state.name

    def used(self) -> int:
        return len(self.held) + len(self.loading) + len(self.unloading)

    def notify(self) -> None:
        self.freed.set()
        self.freed = asyncio.Event()

    def idle(self) -> list[str]:
        return [n for n, h in self.held.items() if h.in_flight == 0 and not self.waiting.get(n)]


class Lease:
    """A request's hold on an adapter on one engine: the adapter is not evicted until it is released."""

    __slots__ = ("_held", "_engine", "_released")

    def __init__(self, engine: Engine, held: Held) -> None:
        self._engine, self._held, self._released = engine, held, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held.in_flight -= 1
        self._held.last_used = time.monotonic()
        if self._held.in_flight == 0:
            self._engine.notify()


class AdapterPlacement:
    """Places catalogue adapters on engines for this worker (see the module's docstring)."""

    def __init__(self, config: GatewayConfig, pool: UpstreamPool, metrics: GatewayMetrics | None = None,
                 rng: random.Random | None = None) -> None:
        self.spec: AdapterPlacementSpec = config.adapter_placement
        self.pool = pool
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.engines = {n: Engine(s, s.spec.adapter_slots) for n, s in pool.states.items() if s.spec.adapter_slots}
        self.adapters = {m.name: m.adapter for m in config.models.values() if m.adapter is not None}
        self.models = {m.name: m for m in config.models.values() if m.adapter is not None}
        self._healthy: dict[str, bool | None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        if self.engines and self.adapters:
            self._loop_task = asyncio.create_task(self._sync_loop(), name="adapter-sync")

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.sync(e) for e in self.engines.values() if e.state.healthy is not False))
            await self._unload_idle()
            await asyncio.sleep(self.spec.sync_interval_s)

    def health_checked(self) -> None:
        """After each health check: an engine that came back (or answered for the first time) is re-read."""
        for e in self.engines.values():
            was, now = self._healthy.get(e.name), e.state.healthy
            self._healthy[e.name] = now
            if now and not was and self.adapters:
                self._spawn(self.sync(e))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ ordering
    def order(self, model: Model, states: list[DeploymentState]) -> list[DeploymentState]:
        """Engines to try for an adapter: those holding it (healthy, least loaded first), then those where it
        can be loaded (a free slot, then an idle adapter to evict), least loaded first. A hot adapter goes
        first to one more engine (with a free slot, or an idle adapter and less load than its holder).
        Policy random: every engine in a random order."""
        a = model.adapter
        assert a is not None
        holders: list[DeploymentState] = []
        others: list[DeploymentState] = []
        for s in states:
            e = self.engines.get(s.name)
            if e is None:
                continue
            (holders if a.name in e.held else others).append(s)
        if self.spec.policy == "random":  # the baseline: no use of what is where (benchmark, docs/benchmarks.md)
            mixed = holders + others
            self.rng.shuffle(mixed)
            mixed.sort(key=lambda s: s.healthy is False)
            return mixed
        holders.sort(key=lambda s: (s.healthy is False, s.load()))
        others.sort(key=lambda s: (s.healthy is False, not self._free(s), not self._evictable(s), s.load()))
        r = self.spec.replicate_in_flight
        # Hot: every holder has r requests of it in flight. One more copy goes to the best other engine if it
        # has a free slot, or an idle adapter to evict and fewer requests in flight than the busiest holder.
        if (holders and others and r is not None and others[0].healthy is not False
                and (self._free(others[0]) or (self._evictable(others[0]) and others[0].load() < holders[0].load()))
                and all(self.engines[s.name].held[a.name].in_flight >= r for s in holders)):
            return [others[0], *holders, *others[1:]]
        return holders + others

    def _free(self, s: DeploymentState) -> bool:
        e = self.engines[s.name]
        return e.used() < e.slots

    def _evictable(self, s: DeploymentState) -> bool:
        return bool(self.engines[s.name].idle())

    def holders(self, adapter: str) -> list[str]:
        return [e.name for e in self.engines.values() if adapter in e.held]

    # ------------------------------------------------------------------ acquire / load / evict
    async def acquire(self, state: DeploymentState, model: Model, rec: RequestRecord) -> Lease:
        """Hold `model`'s adapter on this engine, loading it first if needed (waiting for a load under way,
        or for a slot while every adapter there has requests in flight). A failed or slow load raises
        Retryable (the next engine, or the route's next candidate, is tried); a missing adapter file raises
        a GatewayError naming it."""
        a = model.adapter
        assert a is not None
        e = self.engines[state.name]
        h = e.held.get(a.name)
        if h is not None:  # the common case: no await, no timing
            return self._lease(e, h)
        t0 = time.perf_counter()
        deadline = t0 + self.spec.slot_wait_s
        try:
            while True:
                h = e.held.get(a.name)
                if h is not None:
                    return self._lease(e, h)
                task = e.loading.get(a.name)
                if task is None:
                    victim = None
                    if e.used() >= e.slots:
                        victim = self._victim(e, a.name)
                        if victim is None:  # every slot busy: wait for one to free
                            left = deadline - time.perf_counter()
                            if left <= 0:
                                raise Retryable("adapter_slots_busy", errors.overloaded(
                                    f"every adapter slot of deployment {state.name} has requests in flight; "
                                    f"none freed within {self.spec.slot_wait_s:g}s"), blame=None)
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(left):
                                    await e.freed.wait()
                            continue
                        self._begin_unload(e, victim)
                    # No await between the check above and registering the load: concurrent requests for this
                    # adapter join this one task (the eviction included) instead of evicting and loading again.
                    reason = self._reason(e, a.name)
                    task = asyncio.create_task(self._load(e, model, reason, victim), name=f"load-{a.name}-{e.name}")
                    task.add_done_callback(_retrieve)
                    e.loading[a.name] = task
                    rec.routing.adapter_load = reason
                elif rec.routing.adapter_load is None:
                    rec.routing.adapter_load = "joined"  # waited for a load another request started
                e.waiting[a.name] = e.waiting.get(a.name, 0) + 1
                try:
                    load_s = await asyncio.shield(task)  # a client leaving does not abort the load others wait for
                finally:
                    if e.waiting[a.name] <= 1:
                        del e.waiting[a.name]
                    else:
                        e.waiting[a.name] -= 1
                if rec.routing.adapter_load not in (None, "joined"):
                    self._charge(rec, model, e.name, load_s)
        finally:
            rec.timing.adapter_load_s += time.perf_counter() - t0

    def _lease(self, e: Engine, h: Held) -> Lease:
        h.in_flight += 1
        h.last_used = time.monotonic()
        return Lease(e, h)

    def _reason(self, e: Engine, name: str) -> str:
        if name in e.lost:
            return "reload"
        return "replica" if any(name in o.held for o in self.engines.values()) else "cold"

    def _victim(self, e: Engine, keep: str) -> str | None:
        """The idle adapter to evict (the least recently used; policy random: any); None: none is idle."""
        idle = [n for n in e.idle() if n != keep]
        if not idle:
            return None
        return self.rng.choice(idle) if self.spec.policy == "random" else min(idle, key=lambda n: e.held[n].last_used)

    async def _make_room(self, e: Engine, keep: str) -> bool:
        """Unload one idle adapter; False: none is idle."""
        victim = self._victim(e, keep)
        if victim is None:
            return False
        self._begin_unload(e, victim)
        await self._unload(e, victim, self.spec.policy)
        return True

    @staticmethod
    def _begin_unload(e: Engine, name: str) -> None:
        """Synchronously: no request can take it, and no other request picks it as a victim, from now on."""
        e.held.pop(name, None)
        e.lost.discard(name)
        e.unloading.add(name)

    async def _unload(self, e: Engine, name: str, reason: str) -> None:
        if name not in e.unloading:
            self._begin_unload(e, name)
        try:
            status, data = await self._post(e, "/v1/unload_lora_adapter", {"lora_name": name}, 30.0)
            if status not in (200, 404):  # 404: already gone (a restart, another worker)
                log.warning("unloading adapter %s from %s: HTTP %s %s", name, e.name, status,
                            error_message(json_or_none(data)))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("unloading adapter %s from %s failed: %s", name, e.name, type(exc).__name__)
        finally:
            e.unloading.discard(name)
            e.notify()
        if self.metrics is not None:
            self.metrics.adapter_evictions.labels(name, e.name, reason).inc()
        self._gauge(e)

    async def _load(self, e: Engine, model: Model, reason: str, evict: str | None = None) -> float:
        """The load itself, as its own task (after unloading `evict`, already marked as unloading): returns the
        seconds it took; the adapter is then held."""
        a = model.adapter
        assert a is not None
        try:
            if evict is not None:
                await self._unload(e, evict, self.spec.policy)
            t0 = time.perf_counter()
            for room_retry in (True, False):
                outcome = await self._load_once(e, a)
                if outcome == "ok":
                    break
                # The engine says its slots are full (another worker loaded, or it counts differently):
                # re-read what it holds and evict one idle adapter, then try once more; never in a loop.
                if room_retry:
                    await self.sync(e)
                    if await self._make_room(e, a.name):
                        continue
                self._failed(a.name, e.name, "slots_full")
                raise Retryable("adapter_slots_full", errors.overloaded(
                    f"deployment {e.name} refused to load adapter '{a.name}': its adapter slots are full"),
                    blame=None)
            seconds = time.perf_counter() - t0
            e.held[a.name] = Held(0, time.monotonic())
            e.lost.discard(a.name)
            if self.metrics is not None:
                self.metrics.adapter_loads.labels(a.name, e.name, reason).inc()
                self.metrics.adapter_load_seconds.labels(e.name).observe(seconds)
            log.info("loaded adapter %s onto %s in %.3f s (%s)", a.name, e.name, seconds, reason)
            return seconds
        finally:
            e.loading.pop(a.name, None)
            e.notify()
            self._gauge(e)

    async def _load_once(self, e: Engine, a: Adapter) -> str:
        try:
            status, data = await self._post(e, "/v1/load_lora_adapter", {"lora_name": a.name, "lora_path": a.path},
                                            self.spec.load_timeout_s)
        except TimeoutError:
            self._failed(a.name, e.name, "timeout")
            raise Retryable("adapter_load_timeout", errors.upstream_unavailable(
                f"deployment {e.name} did not load adapter '{a.name}' within {self.spec.load_timeout_s:g}s"),
                blame=None) from None
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(a.name, e.name, "error")
            raise Retryable("adapter_load_failed", errors.upstream_unavailable(
                f"deployment {e.name} could not load adapter '{a.name}': {type(exc).__name__}")) from None
        if status == 200:
            return "ok"
        message = error_message(json_or_none(data))
        if status == 400 and "already been loaded" in message:
            return "ok"  # loaded by another worker or replica: it is there
        if status == 404 and "no adapter found" in message.lower():
            self._failed(a.name, e.name, "not_found")
            log.error("adapter %s: no adapter at %s on deployment %s", a.name, a.path, e.name)
            raise GatewayError(500, f"Adapter '{a.name}' cannot be loaded: deployment {e.name} finds no adapter at "
                               f"'{a.path}' (adapters.{a.name}.path).", type="api_error", code="adapter_not_found")
        if any(w in message.lower() for w in _FULL_WORDS):
            return "full"
        self._failed(a.name, e.name, "error")
        raise Retryable("adapter_load_failed", errors.upstream_unavailable(
            f"deployment {e.name} could not load adapter '{a.name}': HTTP {status}: {message}"), blame=None)

    def _failed(self, adapter: str, engine: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_load_failures.labels(adapter, engine, reason).inc()

    def _charge(self, rec: RequestRecord, model: Model, engine: str, load_s: float) -> None:
        """The engine time of a load this request caused: its cost, billed or the operator's (config)."""
        rate = model.pricing.gpu_usd_per_second if self.spec.load_usd_per_hour is None else \
            self.spec.load_usd_per_hour / 3600.0
        if not rate:
            return
        pico = round(rate * load_s * PICO)
        rec.money.adapter_load_cost_pico_usd += pico
        if self.metrics is not None:
            assert model.adapter is not None
            self.metrics.adapter_load_cost.labels(model.adapter.name, engine, self.spec.cold_start_billing).inc(
                pico / 1e12)

    # ------------------------------------------------------------------ the engine's own view
    async def lost(self, state: DeploymentState, model: Model) -> None:
        """The engine answered 404 for an adapter this worker thought it held: re-read what it holds."""
        e = self.engines.get(state.name)
        a = model.adapter
        if e is None or a is None:
            return
        if e.held.pop(a.name, None) is not None:
            e.lost.add(a.name)
            log.warning("deployment %s answered 404 for adapter %s: reloading it", e.name, a.name)
            if self.metrics is not None:
                self.metrics.adapter_evictions.labels(a.name, e.name, "lost").inc()
        await self.sync(e)

    async def sync(self, e: Engine) -> None:
        """Make this worker's view of the engine what its /v1/models says (after a restart: nothing)."""
        started = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=10.0)
            async with self.pool.session.get(f"{e.state.spec.url}/v1/models", timeout=timeout,
                                             headers=e.state.headers) as r:
                if r.status != 200:
                    return
                data = orjson.loads(await r.read()).get("data", [])
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError) as exc:
            log.debug("reading %s's models failed: %s", e.name, type(exc).__name__)
            return
        present = {str(m["id"]) for m in data if isinstance(m, dict) and m.get("parent") and m.get("id")}
        for name in list(e.held):
            # one loaded while /v1/models was being read may be missing from its answer: kept
            if name not in present and name not in e.loading and e.held[name].since < started:
                log.warning("deployment %s no longer holds adapter %s (restarted?)", e.name, name)
                e.held.pop(name)
                e.lost.add(name)
                if self.metrics is not None:
                    self.metrics.adapter_evictions.labels(name, e.name, "lost").inc()
        for name in present:
            if name in self.adapters and name not in e.held and name not in e.loading and name not in e.unloading:
                e.held[name] = Held()  # loaded by someone else (another worker, --lora-modules): adopted
        e.synced = True
        e.notify()
        self._gauge(e)

    async def _unload_idle(self) -> None:
        if self.spec.idle_unload_s is None:
            return
        horizon = time.monotonic() - self.spec.idle_unload_s
        for e in self.engines.values():
            for name in [n for n in e.idle() if 0 < e.held[n].last_used < horizon]:
                if name in e.held and e.held[name].in_flight == 0:
                    await self._unload(e, name, "idle")

    async def _post(self, e: Engine, path: str, body: dict[str, Any], timeout_s: float) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=e.state.spec.timeouts.connect)
        async with self.pool.session.post(e.state.spec.url + path, data=orjson.dumps(body), timeout=timeout,
                                          headers={**e.state.headers, **JSON}) as r:
            return r.status, await r.read()

    def _gauge(self, e: Engine) -> None:
        if self.metrics is not None:
            self.metrics.adapters_held.labels(e.name).set(len(e.held))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{engine: {adapter: requests in flight}}: what this worker believes (tests, /debug)."""
        return {e.name: {n: h.in_flight for n, h in e.held.items()} for e in self.engines.values()}


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A load nobody waits for any more (its requests left) must not log 'exception never retrieved'."""
    if not task.cancelled():
        task.exception()

