"""Locust users of the fairness scenario (loadtests/fairness.py runs them): two flooding tenants, one interactive.

Fairness is switched by the clock, in alternating phases of FAIR_PHASE_S seconds from FAIR_T0 (epoch s):
even phases "off" send to the gateway model `plain` (no fair queue, no priority, no objective), odd ones
"on" to `fair` (fair queue, vLLM priority, the interactive class's TTFT objective). Both models are the same
vLLM engine, so the two modes share the run, the machine and its noise.

  FloodUser      tenant flood, FAIR_FLOOD_USERS (16) users back to back, ~1,000-token prompts (batch class)
  Flood2User     tenant flood2, FAIR_FLOOD2_USERS (4) users, the same prompts: an equally weighted tenant
                 that asks with 4x less concurrency (Jain's index is taken between flood and flood2)
  SteadyUser     tenant steady: one short request every FAIR_PACE_S (3 s), open loop (each in its own
                 greenlet); refused for its objective, it waits the Retry-After once and sends again

Every request writes one JSON line to FAIR_RECORDS.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import gevent
from locust import HttpUser, constant, task

T0 = float(os.environ.get("FAIR_T0", "0") or time.time())
PHASE_S = float(os.environ.get("FAIR_PHASE_S", "50"))
PACE_S = float(os.environ.get("FAIR_PACE_S", "3"))
PROMPT_WORDS = int(os.environ.get("FAIR_PROMPT_WORDS", "950"))  # ~1,000 SmolLM2 tokens with the template
KEYS = json.loads(os.environ.get("FAIR_KEYS", "{}"))  # role -> API key
_records = open(os.environ["FAIR_RECORDS"], "a", buffering=1) if os.environ.get("FAIR_RECORDS") else None  # noqa: SIM115
WORDS = ("report", "weather", "market", "river", "engine", "garden", "signal", "harbor", "letter", "window",
         "forest", "number", "station", "mirror", "planet", "silver", "castle", "bridge", "summer", "paper")


def mode_at(t: float) -> str:
    return "off" if int(max(0.0, t - T0) // PHASE_S) % 2 == 0 else "on"  # spawned early: the first phase


class _FairUser(HttpUser):
    abstract = True
    tenant = ""

    def on_start(self) -> None:
        self.rng = random.Random()

    def send(self, mode: str, key: str, content: str, max_tokens: int, retry: bool = False) -> dict[str, Any]:
        body = {"model": "fair" if mode == "on" else "plain", "max_tokens": max_tokens, "stream": True,
                "messages": [{"role": "user", "content": content}], "temperature": 0.7,
                "stream_options": {"include_usage": True}}
        rec: dict[str, Any] = {"t": time.time(), "mode": mode, "tenant": self.tenant, "retry": retry}
        t0 = time.perf_counter()
        first = None
        acc: dict[str, Any] | None = None
        with self.client.post("/v1/chat/completions", data=json.dumps(body), stream=True, catch_response=True,
                              name=f"{self.tenant}-{mode}",
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}) as r:
            rec["status"] = r.status_code
            if r.status_code == 200:
                try:
                    for line in r.iter_lines():
                        if line.startswith(b"data: {") and first is None and b'"content"' in line:
                            first = time.perf_counter()
                        elif line.startswith(b": x-gateway-accounting "):
                            acc = json.loads(line[len(b": x-gateway-accounting "):])
                except Exception as e:  # noqa: BLE001 - a broken stream is recorded, not raised
                    rec["error"] = type(e).__name__
                r.success() if acc is not None else r.failure("no accounting trailer")
            else:
                rec["retry_after"] = r.headers.get("retry-after")
                try:
                    rec["error"] = r.json()["error"]["code"]
                except Exception:  # noqa: BLE001
                    rec["error"] = f"HTTP {r.status_code}"
                # a refusal for the objective is the gateway working as designed, not a failed request
                r.success() if r.status_code == 429 else r.failure(rec["error"])
        rec["end"] = time.time()
        rec["e2e_ms"] = (time.perf_counter() - t0) * 1e3
        if first is not None:
            rec["ttft_ms"] = (first - t0) * 1e3
        if acc is not None:
            for k in ("prompt_tokens", "completion_tokens", "ttft_ms", "queue_ms", "slo_predicted_ms", "slo_result",
                      "priority", "priority_class", "deployment"):
                rec[f"gw_{k}"] = acc.get(k)
        if _records is not None:
            _records.write(json.dumps(rec) + "\n")
        return rec


class _Flood(_FairUser):
    abstract = True
    wait_time = constant(0)

    @task
    def flood(self) -> None:
        # a fresh start each time: vLLM's prefix cache must not make the flood cheap
        words = [f"{self.rng.randrange(10**6)}"] + [self.rng.choice(WORDS) for _ in range(PROMPT_WORDS)]
        self.send(mode_at(time.time()), KEYS[self.tenant], "Summarise: " + " ".join(words), 16)


class FloodUser(_Flood):
    tenant = "flood"
    fixed_count = int(os.environ.get("FAIR_FLOOD_USERS", "16"))


class Flood2User(_Flood):
    tenant = "flood2"
    fixed_count = int(os.environ.get("FAIR_FLOOD2_USERS", "4"))


class SteadyUser(_FairUser):
    tenant = "steady"
    fixed_count = 1
    wait_time = constant(PACE_S)

    @task
    def ask(self) -> None:
        gevent.spawn(self._ask)  # open loop: a steady rate, whatever the answers' latency

    def _ask(self) -> None:
        mode = mode_at(time.time())
        key = KEYS["steady-on" if mode == "on" else "steady-off"]
        q = f"In one word, what colour is the sky? ({self.rng.randrange(10**6)})"
        rec = self.send(mode, key, q, 8)
        if rec["status"] == 429 and rec.get("retry_after"):
            gevent.sleep(float(rec["retry_after"]))  # honoured
            self.send(mode, key, q, 8, retry=True)
