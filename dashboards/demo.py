"""A few minutes of traffic through a gateway against the fake vLLM, scraped by a real Prometheus, then rendered.

    python -m dashboards.demo --minutes 4 --out docs/img/

Uses the same stack as tests/test_dashboards.py (Redis, two fake vLLM servers, the gateway, Prometheus
with deploy/prometheus's rules); this is how docs/img/*.png were made. Needs redis-server and prometheus.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

from dashboards import render
from tests.conftest import start_fake_upstream, start_gateway, stop
from tests.test_dashboards import KEYS, gateway_config, hostport, start_prometheus, start_redis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gw-demo-"))
    big = start_fake_upstream(["big-base"])
    small = start_fake_upstream(["small-base", "nlu-adapter"])
    redis_url, redis = start_redis(tmp)
    cfg = gateway_config(big.url, small.url, redis_url)
    cfg["tenants"]["team-b"]["limits"]["budget_day_usd"] = 0.02
    cfg["tenants"]["team-c"]["limits"]["rpm"] = 60
    cfg["server"] = {"request_log": "off"}
    cfg["redis"]["ledger_buffer"] = 10000
    gw = start_gateway(tmp, cfg)
    prom = start_prometheus(tmp, [
        {"job_name": "gateway", "static_configs": [{"targets": [hostport(gw.url)]}]},
        {"job_name": "vllm", "static_configs": [
            {"targets": [hostport(big.url)], "labels": {"deployment": "big-0"}},
            {"targets": [hostport(small.url)], "labels": {"deployment": "small-0"}}]}])
    big.control(ttft_ms=120, itl_ms=15)
    small.control(ttft_ms=30, itl_ms=4)
    start = time.time()
    end_at = start + args.minutes * 60
    rnd = random.Random(1)

    def one(i: int) -> None:
        tenant = rnd.choice(["team-a", "team-a", "team-b", "team-c"])
        model = rnd.choice(["assistant", "assistant", "big", "small", "nlu"])
        body = {"model": model, "max_tokens": rnd.randint(4, 40), "stream": rnd.random() < 0.6,
                "messages": [{"role": "user", "content": f"question {rnd.randint(0, 30)}"}]}
        if rnd.random() < 0.3:
            body["temperature"] = 0
        httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(body), timeout=30,
                   headers={"Authorization": f"Bearer {KEYS[tenant]}", "Content-Type": "application/json"})

    try:
        with ThreadPoolExecutor(8) as pool:
            i = 0
            while time.time() < end_at:
                phase = (time.time() - start) / (end_at - start)
                if 0.4 < phase < 0.6:
                    big.control(fail_status=503)  # an outage of the big model: fallbacks, breaker
                else:
                    big.control(fail_status=0)
                if 0.75 < phase < 0.85:
                    small.control(kv_cache_usage=0.93, num_waiting=5)
                else:
                    small.control(kv_cache_usage=0.3 + 0.2 * rnd.random(), num_waiting=0)
                if phase > 0.9 and redis.poll() is None:
                    stop(redis)  # Redis goes away for the last minutes: errors, the ledger buffers
                list(pool.map(one, range(i, i + 8)))
                i += 8
                time.sleep(0.2)
        time.sleep(5)
        for name in ("gateway-overview.json", "vllm-engines.json", "cost-tenants.json"):
            render.main(["--prometheus", prom.url, "--out", str(args.out), "--minutes", str(args.minutes + 0.2),
                         "--dashboard", name])
    finally:
        for proc in (prom.proc, gw.proc, redis):
            stop(proc)
        big.kill()
        small.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
