"""Admission by time-to-first-token objective: predict a request's TTFT, refuse (or move) one that would miss.

The prediction for a request of priority p on a deployment is

    queue wait + engine time to first token
    queue wait = 0 when a slot is free, else (requests waiting ahead in its band and better + 1/2)
                 x the deployment's recent slot-holding time / its slots (a slot frees that often)
    engine TTFT = the recent engine-side TTFT (first token minus queue time) of requests of the same
                  priority on that deployment, or, before there is one, prompt tokens / the recent
                  prefill rate (prompt tokens per second of engine TTFT, over all requests)

all figures being exponentially weighted means of this worker's finished streamed requests. A request
predicted to miss its class's objective is refused at once with 429 and a Retry-After of the predicted
time (the work ahead of it is done by then, or the figures are stale and the retry is a probe), or, if
the class says `fallback` and the route has another candidate predicted to meet it, moved there.
Without figures (a cold deployment) a request is admitted.
A prediction resting on an engine figure older than itself (no request of its priority finished since: maybe
because all were refused) admits the request as a probe, so a refusal cannot last forever on stale figures.

Each admitted request keeps its prediction in the record (routing.slo_predicted_ms) next to its measured
TTFT, so the predictor's error is measured (gateway_slo_prediction_error_seconds, the request log).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.config import Model, PriorityClass
from gateway.errors import GatewayError
from gateway.fair_queue import FairQueue
from gateway.record import RequestRecord
from gateway.routing.policy import Plan

EWMA = 0.2  # weight of the newest sample


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA * (new - old)


@dataclass(slots=True)
class DeploymentRates:
    hold_s: float | None = None  # slot holding time (send to last byte)
    prefill_tps: float | None = None  # prompt tokens per second of engine-side TTFT
    engine_ttft: dict[int, float] = field(default_factory=dict)  # by priority
    engine_at: dict[int, float] = field(default_factory=dict)  # when engine_ttft[priority] last moved
    sampled_at: float = 0.0  # monotonic time of the newest sample


class SloPredictor:
    def __init__(self, queues: dict[str, FairQueue], limits: dict[str, int]) -> None:
        self.queues = queues
        self.limits = limits  # max_concurrency per deployment
        self.rates: dict[str, DeploymentRates] = {}
        self.clock = time.monotonic

    def observe(self, rec: RequestRecord) -> None:
        """Learn from a finished request that was served (finalize observer)."""
        dep = rec.routing.deployment
        if rec.end.status != 200 or dep is None or rec.end.cache == "hit":
            return
        r = self.rates.setdefault(dep, DeploymentRates())
        ok = [a for a in rec.routing.attempts if a.outcome == "ok"]
        if ok:
            r.hold_s = _ewma(r.hold_s, ok[-1].seconds)
        t = rec.timing
        if t.ttft_s is not None:
            engine = max(1e-3, t.ttft_s - t.queue_s)
            prio = rec.routing.priority if rec.routing.priority is not None else 0
            r.engine_ttft[prio] = _ewma(r.engine_ttft.get(prio), engine)
            r.engine_at[prio] = self.clock()
            if rec.usage.prompt_tokens:
                r.prefill_tps = _ewma(r.prefill_tps, rec.usage.prompt_tokens / engine)
        r.sampled_at = self.clock()

    def predict(self, deployment: str, priority: int, prompt_tokens: int, in_flight: int) -> float | None:
        """Predicted seconds to the first token of a request sent to this deployment now (None: no figures)."""
        r = self.rates.get(deployment)
        if r is None:
            return None
        engine = r.engine_ttft.get(priority)
        if engine is None:
            if r.prefill_tps is None:
                return None
            engine = prompt_tokens / r.prefill_tps
        q = self.queues.get(deployment)
        limit = self.limits.get(deployment, 1)
        if q is not None:
            ahead = q.queued_ahead(priority)
            busy = ahead > 0 or not q.may_start(priority)
        else:
            ahead, busy = 0, in_flight >= limit
        # slots free every hold_s / limit on average; the first one, half that after a random arrival
        wait = (ahead + 0.5) * (r.hold_s or 0.0) / max(1, limit) if busy else 0.0
        return wait + engine

    def stale(self, deployment: str, priority: int, predicted_s: float) -> bool:
        """No request of this priority has finished on the deployment for longer than the prediction (the
        figure it rests on may be out of date, e.g. because every such request was refused): admit a probe."""
        r = self.rates.get(deployment)
        if r is None:
            return False
        return self.clock() - r.engine_at.get(priority, r.sampled_at) > max(1.0, predicted_s)


def retry_after_s(predicted_s: float) -> int:
    """Whole seconds until a retry is admitted: by then the work predicted ahead of this request is done
    (so the prediction has come down), or, if nothing has finished to say so, the figures are stale and the
    retry is admitted as a probe (SloPredictor.stale). At least 1."""
    return max(1, math.ceil(predicted_s))


class SloAdmission:
    """The admission step: refuse, move or let through a request whose class has a TTFT objective."""

    def __init__(self, predictor: SloPredictor, in_flight: Callable[[str], int],
                 usable: Callable[[str], bool]) -> None:
        self.predictor = predictor
        self.in_flight = in_flight
        self.usable = usable  # the deployment's breaker is not open

    def _predict(self, model: Model, priority: int, prompt_tokens: int) -> tuple[float | None, bool]:
        """The best prediction over the model's usable deployments, and whether it rests on stale figures."""
        best: tuple[float | None, bool] = (None, False)
        for d in model.deployments:
            if not self.usable(d.name):
                continue
            p = self.predictor.predict(d.name, priority, prompt_tokens, self.in_flight(d.name))
            if p is None:
                return None, False  # a deployment without figures yet: admitted (cold start)
            if best[0] is None or p < best[0]:
                best = (p, self.predictor.stale(d.name, priority, p))
        return best

    def check(self, rec: RequestRecord, cls: PriorityClass, plan: Plan, body: dict[str, Any]) -> None:
        objective = cls.ttft_slo_s
        if objective is None:
            return
        prio = rec.routing.priority if rec.routing.priority is not None else cls.priority
        tokens = prompt_tokens_estimate(body)
        predicted, stale = self._predict(plan.candidates[0], prio, tokens)
        if predicted is None or predicted <= objective or stale:
            rec.routing.slo_predicted_ms = None if predicted is None else predicted * 1e3
            return
        if cls.on_slo_miss == "fallback":
            for m in plan.candidates[1:]:
                p, _ = self._predict(m, prio, tokens)
                if p is None or p <= objective:
                    plan.move([m, *(c for c in plan.candidates if c is not m)], "slo",
                              f"{plan.candidates[0].name} predicted {predicted * 1e3:.0f} ms to first token > "
                              f"{cls.name} objective {objective * 1e3:.0f} ms")
                    rec.routing.rule, rec.routing.fallback_reason = plan.rule, plan.reason
                    rec.routing.slo_predicted_ms = None if p is None else p * 1e3
                    rec.routing.slo_result = "fallback"
                    return
        rec.routing.slo_predicted_ms = predicted * 1e3
        rec.routing.slo_result = "refused"
        rec.end.limited_by = "slo"
        retry = retry_after_s(predicted)
        raise GatewayError(
            429, f"The predicted time to first token ({predicted * 1e3:.0f} ms) exceeds the objective of "
                 f"priority class '{cls.name}' ({objective * 1e3:.0f} ms); retry after {retry} s.",
            type="requests", code="slo_unattainable", param="ttft_slo", headers={"retry-after": str(retry)})


def prompt_tokens_estimate(body: dict[str, Any]) -> int:
    """A rough prompt size for the prefill-rate prediction: ~4 bytes a token of the messages or prompt."""
    part = body.get("messages", body.get("prompt", body.get("input", "")))
    return len(part) // 4 if isinstance(part, str) else len(orjson.dumps(part)) // 4
