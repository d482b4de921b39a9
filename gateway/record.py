"""The one record every request builds; headers, log line, metrics and ledger are all written from it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from gateway.money import usd

if TYPE_CHECKING:
    from gateway.limits import Reservation
    from gateway.tracing import RequestTrace


@dataclass(slots=True)
class Attempt:
    """One try on one deployment; an abandoned one carries what vLLM did for it (its waste)."""

    deployment: str
    model: str  # the name vLLM knows
    outcome: str  # "ok", or why it failed: connect_error, first_token_timeout, upstream_503, ...
    seconds: float  # upstream time (after the slot was granted)
    public_model: str | None = None  # the public model whose prices apply
    queue_s: float = 0.0
    gpu_s: float = 0.0  # its share of the deployment's busy time (docs/config.md, GPU-time share)
    # What vLLM reported doing for an abandoned attempt ("reported"), or "unknown" when it ended before
    # vLLM said anything (a non-stream request cut off); "none": vLLM did no work (refused, unreachable).
    usage: str = "none"
    prompt_tokens: int = 0  # as usage counts them (each prompt once)
    fanout_prompt_tokens: int = 0  # the extra choices' prefills (n > 1)
    completion_tokens: int = 0
    cost_pico_usd: int = 0
    fair_charge: float = 0.0  # tokens its fair queue charged the tenant when it was released (the bound)


# How a request ended (docs/accounting.md has what each one bills and counts as waste).
OUTCOMES = (
    "ok",  # answered in full
    "error",  # refused or failed before any response byte (the status says why)
    "timeout",  # the upstream did not finish within its total timeout: 504
    "client_left_before_response",  # gone while waiting (body, limits, queue, before the first token)
    "client_left_midstream",  # gone while the stream flowed
    "client_left_slow_reader",  # gone after holding the stream back by not reading
    "upstream_failed_midstream",  # vLLM died, stalled or sent an error event after the first token
    "gateway_shutdown",  # cut by the gateway stopping
)


@dataclass(slots=True)
class Identity:
    """Who asked for what."""

    request_id: str
    endpoint: str
    tenant: str = "unauthenticated"
    api_key_hash: str | None = None  # first 12 hex digits of the key's SHA-256, never the key
    requested_model: str | None = None
    stream: bool = False
    wall_time: float = field(default_factory=time.time)


@dataclass(slots=True)
class Routing:
    """Where it went and why: the model and deployment that answered, the rule that moved it, each attempt."""

    served_model: str | None = None  # public model name that answered
    upstream_model: str | None = None  # the name vLLM knows (base model or LoRA adapter)
    deployment: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    route: str | None = None
    primary_model: str | None = None  # the first candidate (what the counterfactual cost is priced at)
    rule: str | None = None
    fallback_reason: str | None = None
    route_decisions: list[str] = field(default_factory=list)
    task: str | None = None  # the task it was routed for (declared, or decided by task_auto)
    task_decision: str | None = None  # task_auto routes: routed, below_threshold, declared, deadline, unavailable, ...
    task_confidence: float | None = None  # task_auto: the classifier's probability of its most likely task
    task_best: str | None = None  # task_auto: that most likely task (routed to only at the threshold)
    deadline_ms: float | None = None
    predicted_ms: float | None = None
    balance: str | None = None  # how the deployment was chosen (routing/balance.py): least_outstanding, affinity, ...
    prefix_blocks_matched: int = 0  # prompt blocks the chosen deployment was sent before (balance: prefix)
    priority_class: str | None = None  # the scheduling class it ran in (gateway/priority.py)
    priority: int | None = None  # vLLM's `priority` for it (sent only to deployments with priority scheduling)
    slo_ttft_ms: float | None = None  # its class's time-to-first-token objective
    slo_predicted_ms: float | None = None  # the predicted time to first token at admission (gateway/slo.py)
    slo_result: str | None = None  # met | missed | refused | fallback
    # a catalogue adapter loaded for this request (routing/adapters.py): cold | replica | reload, or joined
    # (it waited for a load another request started); None: it was already held
    adapter_load: str | None = None


@dataclass(slots=True)
class Timing:
    """Durations in seconds (None when not applicable, e.g. no token ever arrived); logged in ms."""

    queue_s: float = 0.0
    upstream_s: float = 0.0  # time spent waiting on vLLM (connect, headers, every chunk read)
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float = 0.0
    overhead_s: float = 0.0
    client_wait_s: float = 0.0  # time blocked writing to a client that read slowly (back-pressure)
    gpu_s: float = 0.0  # this request's share of its deployment's busy time (GPU-time cost basis)
    routing_s: float = 0.0  # deciding the route: task_auto's embedding call (not overhead: waiting on vLLM)
    adapter_load_s: float = 0.0  # waiting for its LoRA adapter to be loaded (or for a slot to load it into)


@dataclass(slots=True)
class Usage:
    """Tokens exactly as vLLM's usage reported them, and the work vLLM did that nobody is billed for."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    fanout_prompt_tokens: int = 0  # prefills of the extra choices (n > 1): vLLM did them, usage counts one
    wasted_prompt_tokens: int = 0  # what vLLM did for abandoned attempts (timeouts, fallbacks): not billed
    wasted_completion_tokens: int = 0
    usage_reported: bool = False
    usage_invalid: bool = False  # vLLM sent usage that could not be true (negative, absurd): not billed
    routing_tokens: int = 0  # task_auto: the embedding model's prompt tokens for this request's text


@dataclass(slots=True)
class Money:
    """Exact pico-USD (gateway/money.py); the log adds each amount's USD twin."""

    cost_pico_usd: int = 0
    wasted_cost_pico_usd: int = 0
    counterfactual_cost_pico_usd: int = 0  # what the first candidate would have charged for the same tokens
    saved_pico_usd: int = 0  # on a cache hit: what the answer cost when it was made (the hit itself costs 0)
    prefix_saved_pico_usd: int = 0  # what vLLM's prefix cache saved: cached tokens at the prompt price
    routing_cost_pico_usd: int = 0  # task_auto's embedding call (part of cost_pico_usd, not of the counterfactual)
    # engine time of the adapter load this request caused: in cost_pico_usd when adapter_placement.
    # cold_start_billing is "request", else the operator's (docs/config.md)
    adapter_load_cost_pico_usd: int = 0


@dataclass(slots=True)
class Ending:
    """How the request ended (OUTCOMES), and the stages that can end it early (cache, limits)."""

    status: int = 0
    outcome: str = "ok"
    error_code: str | None = None
    cache: str | None = None  # hit | miss | bypass (None: the request never reached the cache stage)
    limited_by: str | None = None  # the limit that refused it (rpm, tpm, ...), or "skipped" (store down)


PARTS = ("identity", "routing", "timing", "usage", "money", "end")
_LOG_NAMES = {"api_key_hash": "api_key", "wall_time": "ts"}


class RequestRecord:
    """The one record of a request, in typed parts; the log line, headers, metrics and ledger read it."""

    __slots__ = (*PARTS, "started", "in_flight", "ratelimit_headers", "reservation", "final_line", "trace")

    def __init__(self, request_id: str, endpoint: str, tenant: str = "unauthenticated") -> None:
        self.identity = Identity(request_id, endpoint, tenant)
        self.routing = Routing()
        self.timing = Timing()
        self.usage = Usage()
        self.money = Money()
        self.end = Ending()
        self.started = time.perf_counter()  # monotonic origin of every duration
        # working state of the stages, not logged
        self.in_flight = False  # counted in gateway_requests_in_flight{model=requested_model}
        self.ratelimit_headers: dict[str, str] | None = None  # x-ratelimit-* as of admission
        self.reservation: Reservation | None = None  # what admission reserved; settled at finalize
        self.final_line: bytes | None = None  # the record's JSON line, once finalized (finalize runs once)
        self.trace: RequestTrace | None = None  # its spans, when tracing is on (gateway/tracing.py)

    @property
    def cost_usd(self) -> float:
        return usd(self.money.cost_pico_usd)

    @property
    def saved_usd(self) -> float:
        return usd(self.money.saved_pico_usd)

    def finish(self, now: float | None = None) -> None:
        t = self.timing
        t.e2e_s = (time.perf_counter() if now is None else now) - self.started
        t.overhead_s = max(0.0, t.e2e_s - t.upstream_s - t.queue_s - t.client_wait_s - t.routing_s
                           - t.adapter_load_s)

    def judge_slo(self) -> None:
        """met / missed for an admitted streamed request with a TTFT objective (refused and fallback are
        set at admission); left unset when nothing can be judged (no first token, a cache hit)."""
        r = self.routing
        if r.slo_ttft_ms is None or r.slo_result is not None:
            return
        if self.end.status != 200 or self.timing.ttft_s is None or self.end.cache == "hit":
            return
        r.slo_result = "met" if self.timing.ttft_s * 1e3 <= r.slo_ttft_ms else "missed"

    def mark_first_token(self, now: float) -> None:
        if self.timing.ttft_s is None:
            self.timing.ttft_s = now - self.started

    def mark_tokens_done(self, now: float) -> None:
        """Mean time per output token after the first: (last - first) / (n - 1)."""
        t, n = self.timing, self.usage.completion_tokens
        if t.ttft_s is not None and n > 1:
            t.tpot_s = max(0.0, (now - self.started - t.ttft_s) / (n - 1))

    def to_log(self) -> dict[str, Any]:
        """The log line, derived from the parts (see _log_line_source): durations in ms, money with its USD
        twin, attempts summarised."""
        return _to_log(self)


def _attempt_log(a: Attempt) -> dict[str, Any]:
    out: dict[str, Any] = {"deployment": a.deployment, "model": a.model, "outcome": a.outcome,
                           "ms": round(a.seconds * 1e3, 3), "queue_ms": round(a.queue_s * 1e3, 3)}
    if a.outcome != "ok":
        out.update(usage=a.usage, prompt_tokens=a.prompt_tokens, fanout_prompt_tokens=a.fanout_prompt_tokens,
                   completion_tokens=a.completion_tokens, gpu_ms=round(a.gpu_s * 1e3, 3),
                   cost_pico_usd=a.cost_pico_usd)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _log_line_source() -> str:
    """The source of `_to_log`: one dict literal over every field of every part, generated once at import
    from the dataclasses (so a new field reaches the log by being declared), as fast as a hand-written one."""
    items = []
    for part, cls in zip(PARTS, (Identity, Routing, Timing, Usage, Money, Ending), strict=True):
        for f in fields(cls):
            v = f"r.{part}.{f.name}"
            if f.name == "wall_time":
                items.append(f'"ts": round({v}, 6)')
            elif f.name == "attempts":
                items.append(f'"attempts": [_attempt_log(a) for a in {v}]')
            elif f.name.endswith("_s"):
                items.append(f'"{f.name[:-2]}_ms": _ms({v})')
            elif f.name.endswith("_pico_usd"):
                items.append(f'"{f.name[:-9]}_usd": usd({v})')
                items.append(f'"{f.name}": {v}')
            else:
                items.append(f'"{_LOG_NAMES.get(f.name, f.name)}": {v}')
    return "def _to_log(r):\n    return {" + ", ".join(items) + "}\n"


_namespace: dict[str, Any] = {"_attempt_log": _attempt_log, "_ms": _ms, "usd": usd}
exec(_log_line_source(), _namespace)  # noqa: S102 - our own generated source, built from the dataclasses
_to_log: Callable[[RequestRecord], dict[str, Any]] = _namespace["_to_log"]
