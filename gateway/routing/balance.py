"""Deployment choice within one model: least outstanding requests, or vLLM prefix-cache affinity bounded by load.

`least_outstanding` (the default): healthy deployments first, then the fewest requests in flight per
unit of weight. `prefix`: a request whose prompt starts like an earlier one goes to the deployment that
served that earlier one (its vLLM prefix cache probably still holds the KV blocks), unless that
deployment is over its load bound; see docs/routing.md "Balance policies" for the rules and the peers
they were drawn from.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.config import GatewayConfig, Model, PrefixRoutingSpec
from gateway.routing.breaker import BreakerState, CircuitBreaker

if TYPE_CHECKING:
    from gateway.record import RequestRecord
    from gateway.routing.live import DeploymentLive, LiveStats
    from gateway.upstream import DeploymentState

RECENT_TAU_S = 60.0  # decay time of the recent-requests figure that places new prefixes
# Sizes the index from vLLM's KV capacity in tokens. Prose runs ~4-5 characters a token, code and JSON ~3:
# the upper end, because an index smaller than vLLM's cache forgets prefixes vLLM still holds and moves their
# applications (measured: at 4, 4.2 of the 5 system prompts a 40-block engine holds); one that is too large is
# halved by the engine feedback below when vLLM finds less cached than the index predicts.
CHARS_PER_TOKEN = 6
RATE_SLACK = 4.0  # recent requests (per weight) a deployment may be ahead of the least busy one in any case
TRUST_MIN_PREDICTED = 0.2  # compare vLLM's hit rate to ours only when we expected this much reuse
# ... and only over at least this many blocks sent (~16k tokens): vLLM counts a request when it schedules
# it, seconds after we routed it, so short windows would compare different requests
TRUST_WINDOW_BLOCKS = 256


class Balancer(Protocol):
    """Orders one model's deployments for one request (the execute stage tries them in this order)."""

    def order(self, states: list[DeploymentState], body: dict[str, Any] | None,
              rec: RequestRecord | None) -> list[DeploymentState]: ...


class LeastOutstanding:
    """Healthy first, then least outstanding requests per unit of weight."""

    def order(self, states: list[DeploymentState], body: dict[str, Any] | None,
              rec: RequestRecord | None) -> list[DeploymentState]:
        if len(states) > 1:
            states.sort(key=lambda s: (s.healthy is False, s.load()))
            if rec is not None:
                rec.routing.balance = "least_outstanding"
        return states


def prompt_text_parts(body: dict[str, Any]) -> Iterator[str]:
    """The parts of a request that make up the start of vLLM's prompt, in prompt order.

    The chat template renders tools (if any), then every message's role and content in order, so a
    request that repeats an earlier one's first messages repeats its rendered prefix. Non-text content
    (an image URL) is kept as its JSON, so two requests differing only in an image never look alike.
    A generator: the caller stops reading once it has the characters it hashes.
    """
    tools = body.get("tools")
    if tools:
        yield orjson.dumps(tools).decode()
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            yield f"<|{m.get('role')}|>"
            content = m.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for p in content:
                    if isinstance(p, dict) and isinstance(p.get("text"), str):
                        yield p["text"]
                    else:
                        yield orjson.dumps(p).decode()
            elif content is not None:
                yield orjson.dumps(content).decode()
        return
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]  # a batch of prompts: the first one's prefix (they are usually alike)
        yield first if isinstance(first, str) else orjson.dumps(prompt if isinstance(first, int) else first).decode()


def prefix_blocks(body: dict[str, Any], block_chars: int, max_blocks: int, scope: str = "") -> list[int]:
    """Chained hashes of the prompt's whole blocks of `block_chars` characters (at most `max_blocks`).

    Block i's hash covers blocks 0..i, like vLLM's own block hashes: two prompts share block i's hash
    only if they agree on everything before it. A partial last block is left out (vLLM caches whole
    blocks only). Python's hash is keyed per process, so no client can craft collisions on purpose.
    The chain starts from the tenant's prompt scope: one tenant's prompts never match another's (unless
    both are in a scope the operator declared shared), so routing reveals nothing about other tenants.
    """
    limit = block_chars * max_blocks
    text_parts: list[str] = []
    size = 0
    for part in prompt_text_parts(body):
        text_parts.append(part)
        size += len(part) + 1
        if size >= limit:
            break
    text = "\x1e".join(text_parts)[:limit]
    out: list[int] = []
    h = hash(scope)
    for i in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[i:i + block_chars]))
        out.append(h)
    return out


class DeploymentIndex:
    """The prefix blocks this worker last sent to one deployment, least recently used first."""

    __slots__ = ("blocks", "capacity", "max_capacity", "recent", "recent_at", "predicted", "sent", "engine_hits",
                 "engine_queries")

    def __init__(self, capacity: int) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity = capacity
        self.max_capacity = capacity
        self.recent = 0.0  # requests sent lately, decayed with RECENT_TAU_S
        self.recent_at = time.monotonic()
        # over the current trust window: blocks we expected vLLM to find cached, blocks sent, and vLLM's own
        # prefix-cache hits and queries (tokens)
        self.predicted = 0
        self.sent = 0
        self.engine_hits = 0.0
        self.engine_queries = 0.0

    def matched(self, blocks: Sequence[int]) -> int:
        """How many leading blocks of the prompt this deployment was sent before (and still holds)."""
        n = 0
        for b in blocks:
            if b not in self.blocks:
                break
            n += 1
        return n

    def recent_requests(self, now: float) -> float:
        return self.recent * math.exp(-(now - self.recent_at) / RECENT_TAU_S)

    def add(self, blocks: Sequence[int], matched: int, now: float) -> None:
        self.recent = self.recent_requests(now) + 1.0
        self.recent_at = now
        self.predicted += matched
        self.sent += len(blocks)
        # Tail first, so that the prompt's head is the most recently used: when the index overflows it drops
        # a prefix's last blocks before its first, as vLLM evicts (it frees a request's blocks in reverse
        # order). Head first, an overflow would drop the first block, and matched() stops there: the rest of
        # that prefix would stay in the index unreachable while vLLM still holds its head.
        for b in reversed(blocks):
            self.blocks[b] = None
            self.blocks.move_to_end(b)
        self.shrink_to(self.capacity)

    def shrink_to(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self.blocks) > capacity:
            self.blocks.popitem(last=False)


LEAST_OUTSTANDING = LeastOutstanding()


class PrefixAffinity:
    """Send a prompt where its prefix was sent before, within load bounds; place new prefixes by traffic.

    The bound is that of consistent hashing with bounded loads (Mirrokni et al., 2018): a deployment
    takes a request for affinity only while its in-flight requests, this one included, stay within
    ceil(load_factor * (all in flight + 1) * weight / total weight), and while its recent requests per
    weight (decayed over a minute), this one included, stay within rate_factor times the least busy
    deployment's, or at most RATE_SLACK ahead of it (as SGLang's router, which balances only when both
    an absolute and a relative threshold are passed): the first bound protects latency now, the second
    the split of the traffic over time. A hot prefix fills its deployment up to a bound and then spills
    to the least loaded one, which learns the prefix too: from then on both serve it (the hot prefix is
    replicated, not queued). A deployment whose vLLM reports its KV
    cache fuller than max_kv_cache takes no affinity traffic either (it would preempt or queue).
    """

    def __init__(self, spec: PrefixRoutingSpec, deployments: Sequence[str], live: LiveStats | None,
                 breakers: dict[str, CircuitBreaker] | None = None,
                 scope_of: Callable[[str], str] = str) -> None:
        self.spec = spec
        self.scope_of = scope_of  # tenant -> its prompt scope (config.Features.prompt_scope)
        self.live = live
        self.breakers = breakers or {}
        self.indexes = {name: DeploymentIndex(spec.index_blocks) for name in deployments}

    def index(self, name: str) -> DeploymentIndex:
        return self.indexes[name]

    def _closed(self, name: str) -> bool:
        """Not skipped by its circuit breaker (an open one would turn the choice into a wasted attempt)."""
        b = self.breakers.get(name)
        return b is None or b.state is not BreakerState.OPEN

    def _kv_full(self, name: str) -> bool:
        if self.live is None:
            return False
        live = self.live.by_deployment.get(name)
        return live is not None and live.kv_cache > self.spec.max_kv_cache

    def order(self, states: list[DeploymentState], body: dict[str, Any] | None,
              rec: RequestRecord | None) -> list[DeploymentState]:
        if len(states) < 2 or body is None:
            return LEAST_OUTSTANDING.order(states, body, rec)
        blocks = prefix_blocks(body, self.spec.block_chars, self.spec.max_blocks,
                               self.scope_of(rec.identity.tenant) if rec is not None else "")
        now = time.monotonic()
        up = [s for s in states if s.healthy is not False and self._closed(s.name)] or states
        if not blocks:  # shorter than one block: nothing vLLM could reuse
            decision, first = "short", min(up, key=lambda s: (s.load(), self._recent(s, now)))
        else:
            first, decision = self._choose(up, blocks, now)
        matched = self.index(first.name).matched(blocks)
        self.index(first.name).add(blocks, matched, now)
        if rec is not None:
            rec.routing.balance = decision
            rec.routing.prefix_blocks_matched = matched
        rest = sorted((s for s in states if s is not first), key=lambda s: (s.healthy is False, s.load()))
        return [first, *rest]

    def _recent(self, s: DeploymentState, now: float) -> float:
        return self.index(s.name).recent_requests(now) / s.spec.weight

    def _choose(self, up: list[DeploymentState], blocks: list[int],
                now: float) -> tuple[DeploymentState, str]:
        in_flight = sum(s.in_flight for s in up)
        weight = sum(s.spec.weight for s in up)
        scale = self.spec.load_factor * (in_flight + 1) / weight
        recent = {s.name: self.index(s.name).recent_requests(now) / s.spec.weight for s in up}
        least_recent = min(recent.values())
        best: DeploymentState | None = None
        best_key: tuple[int, float] = (0, 0.0)
        over: set[str] = set()  # hold the prefix, but are over a bound
        for s in up:
            n = self.index(s.name).matched(blocks)
            if n == 0:
                continue
            share = recent[s.name] + 1 / s.spec.weight  # with this request
            over_rate = share - least_recent > RATE_SLACK and share > self.spec.rate_factor * least_recent
            if s.in_flight + 1 > math.ceil(scale * s.spec.weight) or over_rate or self._kv_full(s.name):
                over.add(s.name)
                continue
            key = (n, -s.load())
            if best is None or key > best_key:
                best, best_key = s, key
        if best is not None:
            return best, "affinity"
        roomy = [s for s in up if not self._kv_full(s.name)] or up
        if over:  # relieve the busy ones: among the others, where the fewest requests are in flight now
            others = [s for s in roomy if s.name not in over] or roomy
            return min(others, key=lambda s: (s.load(), self._recent(s, now))), "spill"
        # A new prefix brings its future requests with it: place it where the fewest requests went lately
        # (per weight), so that many applications' prompts split the traffic evenly, then by load.
        return min(roomy, key=lambda s: (self._recent(s, now), s.load())), "new"

    def observe_engine(self, name: str, live: DeploymentLive, hits: float, queries: float, reset: bool) -> None:
        """vLLM's prefix-cache counters moved by hits/queries tokens since the last scrape: check our index.

        A reset (the engine restarted: its counters went down) empties the index. If, over a window of
        TRUST_WINDOW_BLOCKS blocks sent, vLLM found far less cached than the index predicted, the engine
        evicted what we think it holds (its KV cache is smaller than the index, or other traffic shares
        it): the index shrinks to half, down to 64 blocks; while predictions hold, a full index grows back
        by a quarter up to index_blocks, or to what vLLM's KV cache can hold (its num_gpu_blocks *
        block_size tokens, at CHARS_PER_TOKEN characters a token).
        """
        idx = self.indexes.get(name)
        if idx is None:
            return
        if live.kv_capacity_tokens:
            fits = max(64, live.kv_capacity_tokens * CHARS_PER_TOKEN // self.spec.block_chars)
            idx.max_capacity = min(self.spec.index_blocks, fits)
            if idx.capacity > idx.max_capacity:
                idx.shrink_to(idx.max_capacity)
        if reset:
            idx.blocks.clear()
            idx.predicted = idx.sent = 0
            idx.engine_hits = idx.engine_queries = 0.0
            return
        idx.engine_hits += hits
        idx.engine_queries += queries
        if idx.sent < TRUST_WINDOW_BLOCKS or idx.engine_queries <= 0:
            return
        predicted = idx.predicted / idx.sent
        observed = idx.engine_hits / idx.engine_queries
        if predicted >= TRUST_MIN_PREDICTED and observed < 0.5 * predicted:
            idx.shrink_to(max(64, idx.capacity // 2))
        elif observed >= 0.8 * predicted and len(idx.blocks) >= idx.capacity:
            idx.capacity = min(idx.max_capacity, idx.capacity + max(1, idx.capacity // 4))
        idx.predicted = idx.sent = 0
        idx.engine_hits = idx.engine_queries = 0.0


class Balancing:
    """Each model's balancer, compiled once from its config; vLLM's live figures feed the prefix policy."""

    def __init__(self, config: GatewayConfig, live: LiveStats | None = None,
                 breakers: dict[str, CircuitBreaker] | None = None) -> None:
        self._least = LEAST_OUTSTANDING
        self.by_model: dict[str, Balancer] = {}
        self._prefix: list[PrefixAffinity] = []
        for name, model in config.models.items():
            if model.balance == "prefix" and model.prefix_routing is not None:
                p = PrefixAffinity(model.prefix_routing, [d.name for d in model.deployments], live, breakers,
                                   config.features.prompt_scope)
                self._prefix.append(p)
                self.by_model[name] = p
        if live is not None and self._prefix:
            live.prefix_listeners.append(self.observe_engine)

    def order(self, model: Model, states: list[DeploymentState], body: dict[str, Any] | None,
              rec: RequestRecord | None) -> list[DeploymentState]:
        return self.by_model.get(model.name, self._least).order(states, body, rec)

    def observe_engine(self, name: str, live: DeploymentLive, hits: float, queries: float, reset: bool) -> None:
        for p in self._prefix:
            p.observe_engine(name, live, hits, queries, reset)

    def index_of(self, deployment: str) -> DeploymentIndex | None:
        """The prefix index of a deployment under `balance: prefix` (None otherwise), for its size metric."""
        for p in self._prefix:
            if deployment in p.indexes:
                return p.indexes[deployment]
        return None
