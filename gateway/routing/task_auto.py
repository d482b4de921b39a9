"""Automatic task routing (a route's `task_auto`): decide an undeclared request's task from its text.

The request's last user text is embedded by the route's embedding model (vLLM /v1/embeddings, e.g.
all-MiniLM) and scored by one small logistic regression per task, fitted at start-up on the operator's
labelled examples: requests of the task (positives) and requests that must stay on the default model
(negatives, e.g. generation requests that merely mention the task). The request goes to the task's model
only when the probability reaches the route's threshold. A slow, failed or not yet trained classifier
leaves the request on the default route: counted, never an error (docs/routing.md "Automatic task routing").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np
import orjson

from gateway.config import GatewayConfig, Route, TaskAuto
from gateway.pricing import request_cost
from gateway.prompt_tokens import Conversation, text_of
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.upstream import DeploymentState, UpstreamPool

log = logging.getLogger("gateway.task_auto")

# Ways a decision ends (the `outcome` label of gateway_route_decisions_total{rule="task_auto"}).
OUTCOMES = ("routed", "below_threshold", "declared", "deadline", "unavailable", "not_ready", "no_text")
BATCH = 64  # example texts per embedding call while fitting
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits between fitting attempts while the embedding model is away


@dataclass(slots=True)
class Decision:
    outcome: str  # one of OUTCOMES
    task: str | None = None  # the task the request goes to (outcome "routed")
    best: str | None = None  # the most likely task, whatever its probability
    confidence: float | None = None  # its probability
    seconds: float = 0.0  # the embedding call's time (what the decision added to the request)
    tokens: int = 0  # the embedding model's prompt tokens for the text
    cost_pico_usd: int = 0


class EmbeddingUnavailable(Exception):
    """No deployment of the embedding model answered with embeddings."""


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 25) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method (IRLS); classes weighted to count equally.

    x: (n, d) unit-length embeddings, y: (n,) 0/1. Returns (d + 1,) weights, the bias last (not penalised).
    A few hundred examples of a few hundred dimensions: each step is one (d+1)-square solve, milliseconds.
    """
    n = len(y)
    xb = np.hstack([x, np.ones((n, 1))])
    pos = max(1, int(y.sum()))
    sw = np.where(y == 1, n / (2 * pos), n / (2 * max(1, n - pos)))  # balanced class weights
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (sw * (p - y)) + penalty * w
        hess = (xb * (sw * p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        delta = np.linalg.solve(hess, grad)
        w -= delta
        if np.abs(delta).max() < 1e-6:
            break
    return w


def last_user_text(conv: Conversation) -> str | None:
    """The text the task is decided from: the last user message (chat-shaped APIs) or the last prompt."""
    if conv.messages:
        for m in reversed(conv.messages):
            if isinstance(m, dict) and m.get("role") == "user":
                text = text_of(m.get("content"))[0].strip()
                return text or None
        return None
    for t in reversed(conv.texts or []):
        if isinstance(t, str) and t.strip():
            return t.strip()
    return None


class RouteClassifier:
    """One route's classifier: per task a weight vector over the embedding, fitted once from its examples."""

    def __init__(self, route: Route) -> None:
        assert route.auto is not None
        self.route = route
        self.auto: TaskAuto = route.auto
        self.tasks = list(self.auto.examples)
        self.weights: np.ndarray | None = None  # (tasks, d + 1) once fitted

    @property
    def ready(self) -> bool:
        return self.weights is not None

    def fit(self, vectors: dict[str, np.ndarray]) -> None:
        """vectors: the unit embedding of each example's text (cut to max_chars, as requests' are)."""
        rows = []
        for task in self.tasks:
            ex = self.auto.examples[task]
            x = np.stack([vectors[t[: self.auto.max_chars]] for t, _ in ex])
            y = np.array([1.0 if m else 0.0 for _, m in ex])
            rows.append(fit_logistic(x, y, self.auto.l2))
        self.weights = np.stack(rows)

    def probabilities(self, vector: np.ndarray) -> np.ndarray:
        assert self.weights is not None
        z = self.weights[:, :-1] @ vector + self.weights[:, -1]
        return np.asarray(1 / (1 + np.exp(-z)))


class TaskAutoRouter:
    """Every task_auto route's classifier, the embedding calls they make, and their fitting at start-up."""

    def __init__(self, config: GatewayConfig, pool: UpstreamPool, breakers: dict[str, CircuitBreaker],
                 on_fitted: Callable[[str, int], None] | None = None) -> None:
        self.pool = pool
        self.breakers = breakers
        self.classifiers = {name: RouteClassifier(r) for name, r in config.routes.items() if r.auto is not None}
        self.on_fitted = on_fitted  # (route, example tokens embedded): metrics
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ start-up: fit from the examples
    def start(self) -> None:
        if self.classifiers:
            self._task = asyncio.create_task(self._fit_all(), name="task-auto-fit")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _fit_all(self) -> None:
        """Embed each route's examples and fit; while the embedding model is away, retry (requests meanwhile
        take the default route, outcome not_ready)."""
        for name, clf in self.classifiers.items():
            attempt = 0
            while not clf.ready:
                try:
                    await self._fit(name, clf)
                except (EmbeddingUnavailable, TimeoutError, np.linalg.LinAlgError) as e:
                    wait = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                    attempt += 1
                    log.warning("task_auto of route %s: cannot fit yet (%s); retrying in %gs", name, e, wait)
                    await asyncio.sleep(wait)

    async def _fit(self, name: str, clf: RouteClassifier) -> None:
        t0 = time.perf_counter()
        texts = sorted({t[: clf.auto.max_chars] for ex in clf.auto.examples.values() for t, _ in ex})
        vectors: dict[str, np.ndarray] = {}
        tokens = 0
        for i in range(0, len(texts), BATCH):
            batch = texts[i:i + BATCH]
            got, used, _ = await self.embed(clf.auto, batch, timeout_s=60.0)
            vectors.update(zip(batch, got, strict=True))
            tokens += used
        clf.fit(vectors)
        log.info("task_auto of route %s: fitted %d tasks on %d examples in %.1fs", name, len(clf.tasks), len(texts),
                 time.perf_counter() - t0)
        if self.on_fitted is not None:
            self.on_fitted(name, tokens)

    # ------------------------------------------------------------------ the embedding call
    def _deployments(self, auto: TaskAuto) -> list[DeploymentState]:
        states = [self.pool.states[d.name] for d in auto.embedding.deployments]
        usable = [s for s in states if s.healthy is not False and self.breakers[s.name].state is not BreakerState.OPEN]
        return sorted(usable, key=lambda s: s.load())

    async def embed(self, auto: TaskAuto, texts: list[str], timeout_s: float) -> tuple[list[np.ndarray], int, float]:
        """Unit embeddings of the texts, the prompt tokens vLLM reported, and the GPU-time share of the call.
        Raises EmbeddingUnavailable when no deployment answers, TimeoutError when the time is up."""
        last = "no healthy deployment"
        for state in self._deployments(auto):
            body = orjson.dumps({"model": state.spec.upstream_model, "input": texts})
            reading = state.sent(time.perf_counter())
            gpu_s = 0.0
            try:
                async with self.pool.session.post(
                        state.spec.url + "/v1/embeddings", data=body, timeout=aiohttp.ClientTimeout(total=timeout_s),
                        headers={**state.headers, "Content-Type": "application/json"}) as r:
                    raw = await r.read()
                    status = r.status
            except TimeoutError:
                raise  # the caller's deadline (aiohttp's own timeout is one too): no other deployment has time
            except (aiohttp.ClientError, OSError) as e:
                last = f"{state.name}: {type(e).__name__}"
                continue
            finally:
                gpu_s = state.finished(time.perf_counter(), reading)
            if status != 200:
                last = f"{state.name}: HTTP {status}"
                continue
            try:
                data = orjson.loads(raw)
                vecs = [np.asarray(d["embedding"], dtype=np.float64) for d in sorted(data["data"],
                                                                                    key=lambda d: d["index"])]
                tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                last = f"{state.name}: malformed answer"
                continue
            if len(vecs) != len(texts):
                last = f"{state.name}: {len(vecs)} embeddings for {len(texts)} texts"
                continue
            return [v / (np.linalg.norm(v) or 1.0) for v in vecs], tokens, gpu_s
        raise EmbeddingUnavailable(last)

    # ------------------------------------------------------------------ one request
    async def decide(self, route: str, conv: Conversation) -> Decision:
        """The task of one undeclared request (never raises for the classifier's own failures)."""
        clf = self.classifiers[route]
        if not clf.ready:
            return Decision("not_ready")
        text = last_user_text(conv)
        if text is None:
            return Decision("no_text")
        auto = clf.auto
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(auto.deadline_s):
                vecs, tokens, gpu_s = await self.embed(auto, [text[: auto.max_chars]], auto.deadline_s)
        except TimeoutError:
            # vLLM may still embed the text; it reports nothing for a cut call (docs/accounting.md)
            return Decision("deadline", seconds=time.perf_counter() - t0)
        except EmbeddingUnavailable:
            return Decision("unavailable", seconds=time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        cost = request_cost(auto.embedding.pricing, tokens, 0, 0, gpu_s)
        probs = clf.probabilities(vecs[0])
        i = int(np.argmax(probs))
        best, confidence = clf.tasks[i], float(probs[i])
        routed = confidence >= auto.threshold
        return Decision("routed" if routed else "below_threshold", best if routed else None, best, confidence,
                        seconds, tokens, cost)


def describe(d: Decision) -> str:
    """The decision as route_decisions lists it."""
    conf = "" if d.confidence is None else f" {d.best} p={d.confidence:.3f}"
    return f"task_auto: {d.outcome}{conf} in {d.seconds * 1e3:.1f} ms"
