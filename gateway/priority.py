"""Priority classes: the class a request runs in and the `priority` vLLM gets for it; a client may only lower it.

The class comes from the API key, else the tenant, else `default_priority_class`. A client may ask for a
lower class (header `x-gateway-priority-class`) or a larger `priority` number in the body (vLLM's own
field: lower is served first); asking for more than its class is ignored, never an error, so a client
cannot learn or lift its class by probing. The body's field is taken out at once: the execute stage
writes the request's priority only into bodies sent to a deployment started with
`--scheduling-policy priority` (vLLM's V0 engine without it refused any priority but 0; V1 ignores it).
"""

from __future__ import annotations

from typing import Any

from gateway import errors
from gateway.config import PriorityClass, Scheduling
from gateway.record import RequestRecord

HEADER = b"x-gateway-priority-class"
MAX_PRIORITY = 1_000_000
# vLLM's request schemas that carry `priority` (0.32): its Anthropic /v1/messages and /tokenize do not (the field
# would be ignored there), so those requests keep their class (fair queue band, objective) but send none.
SCHEDULED_ENDPOINTS = frozenset({"chat", "completions", "embeddings", "responses"})


def assign(rec: RequestRecord, sched: Scheduling, header: bytes | None, body: dict[str, Any]) -> PriorityClass:
    """Resolve the request's class and priority into the record (and strip the client's `priority`)."""
    cls = sched.class_of(rec.identity.tenant, rec.identity.api_key_hash)
    if header is not None:
        asked = sched.classes.get(header.decode("latin-1").strip().lower())
        if asked is None:
            raise errors.bad_request(f"Unknown priority class; one of: {', '.join(sched.classes)}.",
                                     param="x-gateway-priority-class")
        if asked.priority > cls.priority:  # lower only
            cls = asked
    priority = cls.priority
    raw = body.pop("priority", None)
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int) or abs(raw) > MAX_PRIORITY:
            raise errors.bad_request(f"'priority' must be an integer within +-{MAX_PRIORITY}.", param="priority")
        priority = max(priority, raw)  # a larger number is a lower priority
    rec.routing.priority_class, rec.routing.priority = cls.name, priority
    if cls.ttft_slo_s is not None:
        rec.routing.slo_ttft_ms = cls.ttft_slo_s * 1e3
    return cls


def write_priority(body: dict[str, Any], rec: RequestRecord, scheduled: bool) -> None:
    """The body for one deployment: the priority only where vLLM schedules by it (and its schema has one)."""
    priority = rec.routing.priority
    if scheduled and priority is not None and rec.identity.endpoint in SCHEDULED_ENDPOINTS:
        body["priority"] = priority
    else:
        body.pop("priority", None)
