"""Locust users for the gateway: OpenAI-style traffic with per-request latency, token and cost statistics.

Users (pick them by class name on the locust command line, or let the scenario runner do it):
  StreamingChatUser   streams chat completions; records client TTFT, TPOT and e2e, and the gateway's
                      figures from the stream's final `: x-gateway-accounting {json}` comment
  ChatUser            non-streaming chat completions; the figures come from the x-gateway-* headers
  EmbeddingsUser      /v1/embeddings
  MixedTaskUser       classification (x-gateway-task: classification -> the adapter) mixed with generation

Besides the normal request rows, every answer adds rows of these request types to locust's statistics,
so its percentiles, CSV files and HTML report cover them (the "response time" column holds the value):
  TTFT  ms to the first content token, by served model      TPOT  ms per output token after the first
  E2E   ms end to end, by served model                       TOKENS completion tokens, by served model
  COST  cost in micro-USD (1e-6 USD) the gateway reported    SAVED micro-USD a cache hit saved
Note that these rows are counted in locust's "Aggregated" row too; requests/s are in the rows of type POST.

Environment (all optional): LOADTEST_SEED (default 1), LOADTEST_CHAT_MODEL (assistant),
LOADTEST_EMBED_MODEL (embed), LOADTEST_MIX ("short=6,long=1,repeat=3": prompt kinds of the chat users),
LOADTEST_CLASSIFY_SHARE (0.5, MixedTaskUser), LOADTEST_WAIT ("0.2,1.0": think time in s),
LOADTEST_MAX_REQUESTS (stop after this many requests; 0: no limit), LOADTEST_RECORDS (write one JSON line
per request to this file, for loadtests/report.py), LOADTEST_PROMPTS (the prompt file), LOADTEST_API_KEY.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import gevent
from locust import HttpUser, between, events, task

from loadtests.prompts import load

SEED = int(os.environ.get("LOADTEST_SEED", "1"))
CHAT_MODEL = os.environ.get("LOADTEST_CHAT_MODEL", "assistant")
EMBED_MODEL = os.environ.get("LOADTEST_EMBED_MODEL", "embed")
MIX = {k: float(v) for k, v in (p.split("=") for p in os.environ.get("LOADTEST_MIX", "short=6,long=1,repeat=3")
                                 .split(",") if p)}
CLASSIFY_SHARE = float(os.environ.get("LOADTEST_CLASSIFY_SHARE", "0.5"))
WAIT = [float(x) for x in os.environ.get("LOADTEST_WAIT", "0.2,1.0").split(",")]
MAX_REQUESTS = int(os.environ.get("LOADTEST_MAX_REQUESTS", "0"))
API_KEY = os.environ.get("LOADTEST_API_KEY", "")

PROMPTS = load(os.environ.get("LOADTEST_PROMPTS") or None)
_user_ids = itertools.count()
_sent = itertools.count(1)
_records = open(os.environ["LOADTEST_RECORDS"], "a", buffering=1) if os.environ.get("LOADTEST_RECORDS") else None  # noqa: SIM115


def _fire(env: Any, kind: str, name: str, value: float | None) -> None:
    if value is not None:
        env.events.request.fire(request_type=kind, name=name, response_time=value, response_length=0,
                                exception=None, context={})


def _num(h: Any, key: str) -> float | None:
    v = h.get(key)
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


class _GatewayUser(HttpUser):
    abstract = True
    wait_time = between(WAIT[0], WAIT[-1])

    def on_start(self) -> None:
        self.uid = next(_user_ids)
        self.rng = random.Random(SEED * 100003 + self.uid)  # repeatable per user, whatever the timing
        self.headers = {"Content-Type": "application/json"}
        if API_KEY:
            self.headers["Authorization"] = f"Bearer {API_KEY}"

    # ---------------------------------------------------------------- helpers
    def pick(self, kinds: dict[str, float]) -> dict[str, Any]:
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        return self.rng.choice(PROMPTS[kind])

    def chat_body(self, p: dict[str, Any], stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": p["text"]}],
                                "max_tokens": p["max_tokens"], "stream": stream}
        # repeated prompts are deterministic (temperature 0), so the gateway may cache them; others are not
        body["temperature"] = 0.0 if p["kind"] == "repeat" else 0.7
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def finish(self, name: str, rec: dict[str, Any]) -> None:
        """Custom stats and the request's JSON line; stops the run after LOADTEST_MAX_REQUESTS."""
        env = self.environment
        served = rec.get("served_model") or "none"
        if rec["ok"]:
            _fire(env, "E2E", served, rec["e2e_ms"])
            _fire(env, "TTFT", served, rec.get("ttft_ms"))
            _fire(env, "TPOT", served, rec.get("tpot_ms"))
            _fire(env, "TOKENS", served, rec.get("completion_tokens"))
            if rec.get("cost_usd") is not None:
                _fire(env, "COST", served, rec["cost_usd"] * 1e6)
            if rec.get("cache") == "hit":
                _fire(env, "SAVED", served, (rec.get("saved_usd") or 0.0) * 1e6)
        if _records is not None:
            _records.write(json.dumps({"name": name, "user": type(self).__name__, **rec}) + "\n")
        if MAX_REQUESTS and next(_sent) == MAX_REQUESTS and env.runner is not None:
            gevent.spawn_later(0.1, env.runner.quit)

    def gateway_figures(self, h: Any) -> dict[str, Any]:
        return {"served_model": h.get("x-gateway-model"), "rule": h.get("x-gateway-rule"),
                "fallback_reason": h.get("x-gateway-fallback-reason"), "cache": h.get("x-gateway-cache"),
                "deployment": h.get("x-gateway-deployment")}

    def post_json(self, name: str, path: str, body: dict[str, Any], kind: str,
                  extra_headers: dict[str, str] | None = None) -> None:
        rec: dict[str, Any] = {"t": time.time(), "kind": kind, "stream": False, "ok": False}
        t0 = time.perf_counter()
        with self.client.post(path, data=json.dumps(body), headers={**self.headers, **(extra_headers or {})},
                              name=name, catch_response=True) as r:
            rec["e2e_ms"] = (time.perf_counter() - t0) * 1e3
            rec["status"] = r.status_code
            h = r.headers
            rec.update(self.gateway_figures(h))
            rec.update(prompt_tokens=_num(h, "x-gateway-prompt-tokens"),
                       completion_tokens=_num(h, "x-gateway-completion-tokens"),
                       cost_usd=_num(h, "x-gateway-cost-usd"), saved_usd=_num(h, "x-gateway-saved-usd"),
                       gw_e2e_ms=_num(h, "x-gateway-e2e-ms"), overhead_ms=_num(h, "x-gateway-overhead-ms"))
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}"
                r.failure(rec["error"])
            else:
                rec["ok"] = True
                r.success()
        self.finish(name, rec)

    def stream_chat(self, name: str, body: dict[str, Any], kind: str,
                    extra_headers: dict[str, str] | None = None) -> None:
        rec: dict[str, Any] = {"t": time.time(), "kind": kind, "stream": True, "ok": False}
        t0 = time.perf_counter()
        first = last = None
        chunks = 0
        acc: dict[str, Any] | None = None
        done = False
        error = None
        with self.client.post("/v1/chat/completions", data=json.dumps(body),
                              headers={**self.headers, **(extra_headers or {})}, name=name, stream=True,
                              catch_response=True) as r:
            rec["status"] = r.status_code
            rec.update(self.gateway_figures(r.headers))
            if r.status_code == 200:
                try:
                    for line in r.iter_lines():
                        if line.startswith(b"data: {"):
                            obj = json.loads(line[6:])
                            if "error" in obj:
                                error = f"error event: {obj['error'].get('message')}"
                                continue
                            if any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                                now = time.perf_counter()
                                first = first or now
                                last = now
                                chunks += 1
                        elif line.startswith(b": x-gateway-accounting "):
                            acc = json.loads(line[len(b": x-gateway-accounting "):])
                        elif line == b"data: [DONE]":
                            done = True
                except Exception as e:  # a connection cut mid-stream
                    error = f"stream broken: {type(e).__name__}"
            else:
                error = f"HTTP {r.status_code}"
            end = time.perf_counter()
            rec["e2e_ms"] = (end - t0) * 1e3
            r.request_meta["response_time"] = rec["e2e_ms"]  # the whole stream, not just its headers
            if error is None and not done:
                error = "stream ended without [DONE]"
            if error is None and acc is None:
                error = "no x-gateway-accounting event"
            if error:
                rec["error"] = error
                r.failure(error)
            else:
                rec["ok"] = True
                r.success()
        if first is not None:
            rec["ttft_ms"] = (first - t0) * 1e3
            if chunks > 1 and last is not None:
                rec["tpot_ms"] = (last - first) * 1e3 / (chunks - 1)
        if acc is not None:
            rec.update(served_model=acc.get("served_model"), rule=acc.get("rule"),
                       fallback_reason=acc.get("fallback_reason"), cache=acc.get("cache"),
                       prompt_tokens=acc.get("prompt_tokens"), completion_tokens=acc.get("completion_tokens"),
                       cost_usd=acc.get("cost_usd"), saved_usd=acc.get("saved_usd"), gw_ttft_ms=acc.get("ttft_ms"),
                       gw_tpot_ms=acc.get("tpot_ms"), gw_e2e_ms=acc.get("e2e_ms"), overhead_ms=acc.get("overhead_ms"))
        self.finish(name, rec)


class StreamingChatUser(_GatewayUser):
    weight = 3

    @task
    def chat_stream(self) -> None:
        p = self.pick(MIX)
        self.stream_chat("chat stream", self.chat_body(p, stream=True), str(p["kind"]))


class ChatUser(_GatewayUser):
    weight = 2

    @task
    def chat(self) -> None:
        p = self.pick(MIX)
        self.post_json("chat", "/v1/chat/completions", self.chat_body(p, stream=False), str(p["kind"]))


class EmbeddingsUser(_GatewayUser):
    weight = 1

    @task
    def embed(self) -> None:
        batch = [str(self.rng.choice(PROMPTS["embed"])["text"]) for _ in range(self.rng.choice((1, 1, 1, 4)))]
        self.post_json("embeddings", "/v1/embeddings", {"model": EMBED_MODEL, "input": batch}, "embed")


class MixedTaskUser(_GatewayUser):
    """Classification goes to the adapter (task routing), generation to the large model."""

    weight = 2

    @task
    def mixed(self) -> None:
        if self.rng.random() < CLASSIFY_SHARE:
            p = self.rng.choice(PROMPTS["classify"])
            body = self.chat_body(p, stream=False)
            body["temperature"] = 0.0
            self.post_json("task classification", "/v1/chat/completions", body, "classify",
                           {"x-gateway-task": "classification"})
        else:
            p = self.pick(MIX)
            self.stream_chat("task generation", self.chat_body(p, stream=True), str(p["kind"]),
                             {"x-gateway-task": "generation"})


@events.test_stop.add_listener
def _close_records(**_: Any) -> None:
    if _records is not None:
        _records.flush()
