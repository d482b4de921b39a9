"""Routing rules: order a request's candidate models by task, budget, context length, load and deadline.

Each rule is a small function over the candidate list; the planner applies them in a fixed order and
records which rule moved the request off its first candidate, and why. Failure fallback happens later,
in the execute stage, along the order decided here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import errors
from gateway.config import FailureFallbackSpec, GatewayConfig, Model, Route, RouteSpec
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.live import LiveStats

DEFAULT_FALLBACK = FailureFallbackSpec()
GENERATION_TASKS = frozenset({"generation", "chat", "reasoning", "knowledge", "open", "general"})


@dataclass(slots=True)
class Plan:
    name: str  # what the client asked for (a route or a model)
    requested: Model  # the first candidate before any rule: the counterfactual for cost
    candidates: list[Model]
    max_attempts: int
    budget_s: float
    route: Route | None = None
    rule: str | None = None  # the rule that moved the request off its first candidate
    reason: str | None = None
    decisions: list[str] = field(default_factory=list)
    deadline_s: float | None = None
    predicted_s: float | None = None

    def move(self, new_order: list[Model], rule: str, reason: str) -> None:
        self.decisions.append(f"{rule}: {reason}")
        if new_order[0] is not self.candidates[0]:
            self.rule, self.reason = rule, reason
        self.candidates = new_order


TokenCounter = Callable[[Model, dict[str, Any]], Any]  # async (model, body) -> (prompt_tokens, window) | None


class Planner:
    def __init__(self, config: GatewayConfig, live: LiveStats, breakers: dict[str, CircuitBreaker],
                 budget_fraction: Callable[[str], float], in_flight: Callable[[str], int]) -> None:
        self.config = config
        self.live = live
        self.breakers = breakers
        self.budget_fraction = budget_fraction
        self.in_flight = in_flight

    def resolve(self, name: str) -> Plan:
        route = self.config.routes.get(name)
        if route is not None:
            fb = route.spec.failure_fallback
            return Plan(name, route.candidates[0], list(route.candidates), fb.max_attempts, fb.budget_s, route)
        model = self.config.models.get(name)
        if model is None:
            raise errors.model_not_found(name)
        return Plan(name, model, [model], max(DEFAULT_FALLBACK.max_attempts, len(model.deployments)),
                    DEFAULT_FALLBACK.budget_s)

    async def plan(self, name: str, body: dict[str, Any], tenant: str, task: str | None,
                   deadline_ms: float | None, count_tokens: TokenCounter, task_rule: str = "task") -> Plan:
        """task_rule: "task" for a declared task, "task_auto" for one the route's classifier decided."""
        p = self.resolve(name)
        if p.route is None:
            return p
        spec = p.route.spec
        if task:
            self._task(p, task, task_rule)
        if spec.budget_pressure is not None:
            self._budget(p, spec, tenant)
        if spec.context_length:
            await self._context(p, body, count_tokens)
        if spec.overload is not None:
            self._overload(p, spec)
        if deadline_ms is None and spec.deadline is not None:
            deadline_ms = spec.deadline.default_ms
        if deadline_ms is not None:
            self._deadline(p, spec, deadline_ms / 1e3, _max_tokens(body))
        return p

    # ------------------------------------------------------------------ the rules
    def _task(self, p: Plan, task: str, rule: str) -> None:
        assert p.route is not None
        target = p.route.tasks.get(task)
        if target is not None:
            p.move([target, *(c for c in p.candidates if c is not target)], rule, f"task {task} -> {target.name}")
        elif task not in GENERATION_TASKS:
            raise errors.bad_request(
                f"Unknown task '{task}' for '{p.name}': known tasks are "
                f"{sorted({*p.route.tasks, *GENERATION_TASKS})}.", param="x-gateway-task", code="unknown_task")

    def _budget(self, p: Plan, spec: RouteSpec, tenant: str) -> None:
        assert spec.budget_pressure is not None
        used = self.budget_fraction(tenant)
        if used >= spec.budget_pressure.threshold:
            # A model chosen for the request's task keeps its place: a cheaper general model may not do it.
            keep = p.candidates[:1] if p.rule in ("task", "task_auto") else []
            cheapest_first = keep + sorted(p.candidates[len(keep):], key=lambda m: m.unit_price())
            p.move(cheapest_first, "budget_pressure",
                   f"tenant {tenant} has spent {used:.0%} of a budget (threshold "
                   f"{spec.budget_pressure.threshold:.0%})")

    async def _context(self, p: Plan, body: dict[str, Any], count_tokens: TokenCounter) -> None:
        want = _max_tokens(body) or 0
        upper = _prompt_bytes_upper_bound(body)
        fits: list[Model] = []
        measured: dict[str, tuple[int, int]] = {}
        for m in p.candidates:
            window = self.window(m)
            if window is None or upper + want <= window:
                fits.append(m)  # surely fits (a token is at least one byte): no need to count
                continue
            counted = await count_tokens(m, body)
            if counted is None:
                fits.append(m)  # no deployment could count: let the execute stage find a working one
                continue
            tokens, window = counted
            measured[m.name] = (tokens, window)
            if tokens + want <= window:
                fits.append(m)
        if not fits:
            detail = ", ".join(f"{n}: {t} prompt + {want} completion > {w}" for n, (t, w) in measured.items())
            raise errors.GatewayError(400, f"The prompt does not fit any candidate's context window ({detail}).",
                                      param="messages", code="context_length_exceeded")
        if len(fits) != len(p.candidates):
            dropped = [m.name for m in p.candidates if m not in fits]
            p.move(fits, "context_length", f"prompt too long for {', '.join(dropped)}")

    def window(self, m: Model) -> int | None:
        if m.context_window is not None:
            return m.context_window
        lens = [self.live.get(d.name).max_model_len for d in m.deployments]
        known = [n for n in lens if n is not None]
        return min(known) if known else None

    def overloaded(self, m: Model, spec: RouteSpec) -> str | None:
        """Why every deployment of this model is over a threshold (None if one has room)."""
        o = spec.overload
        assert o is not None
        reasons = []
        for d in m.deployments:
            live = self.live.get(d.name)
            if o.max_waiting is not None and live.waiting > o.max_waiting:
                reasons.append(f"{d.name} has {live.waiting:g} waiting (max {o.max_waiting:g})")
            elif o.max_kv_cache is not None and live.kv_cache > o.max_kv_cache:
                reasons.append(f"{d.name} KV cache {live.kv_cache:.0%} (max {o.max_kv_cache:.0%})")
            elif o.max_in_flight is not None and self.in_flight(d.name) >= o.max_in_flight:
                reasons.append(f"{d.name} has {self.in_flight(d.name)} in flight (max {o.max_in_flight})")
            else:
                return None
        return "; ".join(reasons)

    def _overload(self, p: Plan, spec: RouteSpec) -> None:
        why = {m.name: self.overloaded(m, spec) for m in p.candidates}
        free = [m for m in p.candidates if why[m.name] is None]
        busy = [m for m in p.candidates if why[m.name] is not None]
        if free and busy and why[p.candidates[0].name] is not None:
            p.move(free + busy, "overload", str(why[p.candidates[0].name]))

    def predict_s(self, m: Model, max_tokens: int) -> float | None:
        """The best prediction over the model's usable deployments (None: no figures yet)."""
        best: float | None = None
        for d in m.deployments:
            if self.breakers[d.name].state is BreakerState.OPEN:
                continue
            got = self.live.get(d.name).predict_s(max_tokens)
            if got is not None and (best is None or got < best):
                best = got
        return best

    def _deadline(self, p: Plan, spec: RouteSpec, deadline_s: float, max_tokens: int | None) -> None:
        p.deadline_s = deadline_s
        n = max_tokens or 256
        predictions = {m.name: self.predict_s(m, n) for m in p.candidates}
        meets = [m for m in p.candidates if (predictions[m.name] or 0.0) <= deadline_s]
        # A candidate without figures yet is tried optimistically, but only after those known to meet it.
        meets.sort(key=lambda m: predictions[m.name] is None)
        if meets:
            p.predicted_s = predictions[meets[0].name]
            if meets[0] is not p.candidates[0]:
                first = p.candidates[0]
                p.move([meets[0], *(c for c in p.candidates if c is not meets[0])], "deadline",
                       f"{first.name} predicted {predictions[first.name] or 0:.3f}s > deadline {deadline_s:.3f}s")
            return
        on_miss = spec.deadline.on_miss if spec.deadline is not None else "best_effort"
        text = ", ".join(f"{k} {v:.3f}s" for k, v in predictions.items() if v is not None)
        if on_miss == "reject":
            raise errors.GatewayError(503, f"No candidate of '{p.name}' is expected to meet the deadline of "
                                      f"{deadline_s * 1e3:.0f} ms (predicted: {text}).", type="api_error",
                                      code="deadline_unmeetable")
        fastest = min(p.candidates, key=lambda m: predictions[m.name] or 0.0)
        p.predicted_s = predictions[fastest.name]
        p.move([fastest, *(c for c in p.candidates if c is not fastest)], "deadline",
               f"no candidate meets {deadline_s * 1e3:.0f} ms (predicted: {text}); fastest chosen")


def _max_tokens(body: dict[str, Any]) -> int | None:
    v = body.get("max_completion_tokens") or body.get("max_tokens")
    return v if isinstance(v, int) else None


def _prompt_bytes_upper_bound(body: dict[str, Any]) -> int:
    """An upper bound on prompt tokens: UTF-8 bytes of the text, plus template tokens per message."""
    if "messages" in body:
        total = 16
        for m in body["messages"]:
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(str(part.get("text", "")) for part in c if isinstance(part, dict))
            total += 8 + len(str(c or "").encode())
        return total
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return sum(len(x) if isinstance(x, list) else 1 if isinstance(x, int) else len(str(x).encode()) + 2
                   for x in prompt)
    return len(str(prompt).encode()) + 2
