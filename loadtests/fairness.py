"""Fairness load test against a real vLLM CPU engine: a flooding tenant vs an interactive one, fairness on vs off.

    python -m loadtests.fairness [--engine-url URL] [--phase-s 100] [--phases 4] [--settle-s 40]
                                 [--slo-ms 4000] [--out docs/loadtests/fairness]

One vLLM chat engine started with `--scheduling-policy priority` (a private one is started unless
--engine-url names one that has the policy) and one gateway with two models on it: `plain` (no fair
queue, no priority field, no objective: vLLM's first come, first served) and `fair` (fair queue with 4
slots and 2 more for better priorities, priority classes, the interactive class's TTFT objective).
Locust (loadtests/fairness_locust.py) alternates the two by the clock, off / on / off / on, so both modes
share the run. The first --settle-s seconds of each phase are left out of the figures (requests of the
previous phase are still draining).

Reported (summary.json, report.md, PNG plots in --out): the interactive tenant's p50/p95 TTFT per mode and
their ratio; each flooding tenant's served tokens per second per mode; Jain's index of served tokens between
the two equally weighted flooding tenants; the SLO predictor's p50 absolute error on TTFT; refusals and the
share of refused requests admitted when retried after their Retry-After.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from loadtests.netutil import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
# Priority scheduling, and prefill chunks of 512 tokens: a step of the CPU engine then takes about a second,
# so a short request waits for the steps of at most the requests already running, not for whole prompts.
ENGINE_ARGS = ["--scheduling-policy", "priority", "--max-num-batched-tokens", "512"]
PY = sys.executable
KEYS = {"flood": "sk-fair-flood", "flood2": "sk-fair-flood2", "steady-on": "sk-fair-steady-on",
        "steady-off": "sk-fair-steady-off"}


def gateway_config(engine_url: str, slo_ms: float, log_path: Path) -> dict[str, Any]:
    dep = {"url": engine_url, "model": "smollm2", "timeouts": {"connect": 5, "first_token": 300, "total": 600}}
    return {
        "server": {"request_log": str(log_path), "queue_timeout": 600},
        "auth": {"keys": [{"tenant": "flood", "key": KEYS["flood"]}, {"tenant": "flood2", "key": KEYS["flood2"]},
                          {"tenant": "steady", "key": KEYS["steady-on"], "priority_class": "interactive"},
                          {"tenant": "steady", "key": KEYS["steady-off"], "priority_class": "standard"}]},
        "tenants": {"flood": {"priority_class": "batch"}, "flood2": {"priority_class": "batch"},
                    "steady": {"priority_class": "standard"}},
        # interactive below vLLM's default 0: also ahead of requests that carry no priority (here: `plain`'s
        # requests still queued in vLLM when an "on" phase starts)
        "priority_classes": {"interactive": {"priority": -10, "ttft_slo_ms": slo_ms},
                             "standard": {"priority": 10}, "batch": {"priority": 20}},
        "models": {
            "plain": {"deployments": [{**dep, "name": "plain-0"}]},
            "fair": {"deployments": [{**dep, "name": "fair-0", "priority_scheduling": True, "max_concurrency": 4,
                                      "fair_queue": {"window_s": 60, "priority_slots": 2}}]},
        },
        "metrics_scrape_interval": 1.0,
    }


# ------------------------------------------------------------------ analysis


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def jain(xs: list[float]) -> float | None:
    return (sum(xs) ** 2) / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else None


def windows(t0: float, phase_s: float, phases: int, settle_s: float) -> list[tuple[str, float, float]]:
    """(mode, start, end) of each phase's measured part."""
    return [("off" if i % 2 == 0 else "on", t0 + i * phase_s + settle_s, t0 + (i + 1) * phase_s)
            for i in range(phases)]


def analyse(records: list[dict[str, Any]], t0: float, phase_s: float, phases: int,
            settle_s: float) -> dict[str, Any]:
    wins = windows(t0, phase_s, phases, settle_s)

    def sent_in(r: dict[str, Any], mode: str) -> bool:
        return r["mode"] == mode and any(m == mode and a <= r["t"] < b for m, a, b in wins)

    def tokens(r: dict[str, Any]) -> float:
        return float((r.get("gw_prompt_tokens") or 0) + (r.get("gw_completion_tokens") or 0))

    out: dict[str, Any] = {"modes": {}}
    for mode in ("off", "on"):
        span = sum(b - a for m, a, b in wins if m == mode)
        steady = [r for r in records if r["tenant"] == "steady" and sent_in(r, mode)]
        ttft = [r["ttft_ms"] for r in steady if r.get("status") == 200 and r.get("ttft_ms") is not None]
        served: dict[str, float] = {}
        for tenant in ("flood", "flood2", "steady"):
            # tokens of requests that ended inside the measured windows: served tokens per second
            done = [r for r in records if r["tenant"] == tenant and r.get("status") == 200 and r["mode"] == mode
                    and any(m == mode and a <= r["end"] < b for m, a, b in wins)]
            served[tenant] = sum(tokens(r) for r in done) / span if span else 0.0
        # refusals and their retries over the whole run (a retry may fall outside the window of its refusal)
        every = [r for r in records if r["tenant"] == "steady" and r["mode"] == mode]
        refused = [r for r in every if r.get("status") == 429 and not r.get("retry")]
        retried = [r for r in every if r.get("retry")]
        errs = [abs(r["gw_slo_predicted_ms"] - r["gw_ttft_ms"]) for r in steady
                if r.get("gw_slo_predicted_ms") is not None and r.get("gw_ttft_ms") is not None]
        out["modes"][mode] = {
            "measured_s": span, "steady_requests": len(steady), "steady_ttft_n": len(ttft),
            "steady_ttft_p50_ms": pct(ttft, 50), "steady_ttft_p95_ms": pct(ttft, 95),
            "served_tokens_per_s": served, "jain_flood_flood2": jain([served["flood"], served["flood2"]]),
            "flood_requests_done": sum(1 for r in records if r["tenant"] == "flood" and r["mode"] == mode
                                       and r.get("status") == 200 and any(m == mode and a <= r["end"] < b
                                                                          for m, a, b in wins)),
            "slo_refused_all_run": len(refused), "slo_retried": len(retried),
            "slo_retry_admitted": sum(1 for r in retried if r.get("status") == 200),
            "slo_met": sum(1 for r in steady if r.get("gw_slo_result") == "met"),
            "slo_missed": sum(1 for r in steady if r.get("gw_slo_result") == "missed"),
            "predictor_n": len(errs), "predictor_abs_err_p50_ms": pct(errs, 50),
        }
    on, off = out["modes"]["on"], out["modes"]["off"]
    if on["steady_ttft_p95_ms"] and off["steady_ttft_p95_ms"]:
        out["steady_p95_ttft_ratio_off_over_on"] = off["steady_ttft_p95_ms"] / on["steady_ttft_p95_ms"]
    a_off, a_on = off["served_tokens_per_s"]["flood"], on["served_tokens_per_s"]["flood"]
    out["flood_throughput_change"] = (a_on - a_off) / a_off if a_off else None
    others = ("flood2", "steady")
    out["others_gain_tokens_per_s"] = sum(on["served_tokens_per_s"][t] - off["served_tokens_per_s"][t] for t in others)
    out["flood_drop_tokens_per_s"] = a_off - a_on
    retried = on["slo_retried"] + off["slo_retried"]
    out["retry_admitted_share"] = (on["slo_retry_admitted"] + off["slo_retry_admitted"]) / retried if retried else None
    return out


def plots(records: list[dict[str, Any]], summary: dict[str, Any], t0: float, phase_s: float, phases: int,
          out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i in range(phases):
        if i % 2 == 1:
            ax.axvspan(i * phase_s, (i + 1) * phase_s, color="tab:green", alpha=0.08)
    colors = {"flood": "tab:red", "flood2": "tab:orange", "steady": "tab:blue"}
    for tenant, c in colors.items():
        pts = [(r["t"] - t0, r["ttft_ms"] / 1e3) for r in records if r["tenant"] == tenant and r.get("ttft_ms")]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=10 if tenant != "steady" else 18, c=c, label=tenant, alpha=0.7)
    refused = [(r["t"] - t0, 0.1) for r in records if r.get("status") == 429]
    if refused:
        ax.scatter(*zip(*refused, strict=True), marker="x", c="black", label="refused (SLO, 429)")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the run (shaded: fairness + priority on)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("Time to first token per request, by tenant")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ttft_timeline.png", dpi=110)
    plt.close(fig)
    made.append("ttft_timeline.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    modes = ["off", "on"]
    m = summary["modes"]
    a1.bar([f"{x}\np50" for x in modes] + [f"{x}\np95" for x in modes],
           [(m[x]["steady_ttft_p50_ms"] or 0) / 1e3 for x in modes] + [(m[x]["steady_ttft_p95_ms"] or 0) / 1e3
                                                                       for x in modes],
           color=["tab:gray", "tab:green", "tab:gray", "tab:green"])
    a1.set_ylabel("s")
    a1.set_title("interactive tenant's TTFT")
    width = 0.25
    for j, tenant in enumerate(("flood", "flood2", "steady")):
        a2.bar([i + (j - 1) * width for i in range(2)], [m[x]["served_tokens_per_s"][tenant] for x in modes], width,
               label=tenant, color=colors[tenant])
    a2.set_xticks(range(2), [f"{x} (Jain {m[x]['jain_flood_flood2'] or 0:.2f})" for x in modes])
    a2.set_ylabel("served tokens / s")
    a2.set_title("served tokens per tenant")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fairness_summary.png", dpi=110)
    plt.close(fig)
    made.append("fairness_summary.png")
    return made


def report_md(summary: dict[str, Any], command: str, pngs: list[str]) -> str:
    m = summary["modes"]

    def f(v: Any, fmt: str = "{:.0f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = [f"# Fairness load test\n\nCommand: `{command}`\n",
             "| | off (FCFS) | on (fair queue + priority + SLO) |", "|---|---|---|"]
    rows = [("interactive TTFT p50 (ms)", "steady_ttft_p50_ms", "{:.0f}"),
            ("interactive TTFT p95 (ms)", "steady_ttft_p95_ms", "{:.0f}"),
            ("interactive requests measured", "steady_ttft_n", "{}"),
            ("Jain's index flood vs flood2", "jain_flood_flood2", "{:.3f}"),
            ("flood requests completed", "flood_requests_done", "{}"),
            ("SLO refusals / retried / retry admitted (whole run)", None, ""),
            ("SLO met / missed", None, ""),
            ("predictor p50 abs error (ms)", "predictor_abs_err_p50_ms", "{:.0f}")]
    for label, key, fmt in rows:
        if key is None and label.startswith("SLO refusals"):
            cells = [f"{m[x]['slo_refused_all_run']} / {m[x]['slo_retried']} / {m[x]['slo_retry_admitted']}"
                     for x in m]
        elif key is None:
            cells = [f"{m[x]['slo_met']} / {m[x]['slo_missed']}" for x in m]
        else:
            cells = [f(m[x][key], fmt) for x in m]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for tenant in ("flood", "flood2", "steady"):
        lines.append(f"| served tokens/s, {tenant} | {m['off']['served_tokens_per_s'][tenant]:.1f} | "
                     f"{m['on']['served_tokens_per_s'][tenant]:.1f} |")
    lines += ["", f"- p95 TTFT ratio off/on: {f(summary.get('steady_p95_ttft_ratio_off_over_on'), '{:.2f}')}",
              f"- flood throughput change on vs off: {f(summary.get('flood_throughput_change'), '{:+.1%}')} "
              f"({f(summary['flood_drop_tokens_per_s'], '{:.1f}')} tokens/s less; the other tenants gained "
              f"{f(summary['others_gain_tokens_per_s'], '{:.1f}')} tokens/s)",
              f"- refused requests admitted when retried after Retry-After: "
              f"{f(summary.get('retry_admitted_share'), '{:.0%}')}", ""]
    lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run


def finish(records: list[dict[str, Any]], run: dict[str, Any], out: Path) -> None:
    summary = analyse(records, run["t0"], run["phase_s"], run["phases"], run["settle_s"])
    summary.update({k: v for k, v in run.items() if k != "t0"}, records=len(records))
    pngs = plots(records, summary, run["t0"], run["phase_s"], run["phases"], out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_md(summary, run["command"], pngs))
    print(json.dumps(summary, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-url", help="a vLLM chat engine serving `smollm2` with --scheduling-policy priority")
    ap.add_argument("--phase-s", type=float, default=100.0)
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--settle-s", type=float, default=40.0)
    ap.add_argument("--slo-ms", type=float, default=4000.0)
    ap.add_argument("--pace-s", type=float, default=3.0)
    ap.add_argument("--flood-users", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "docs" / "loadtests" / "fairness"))
    ap.add_argument("--reanalyse", metavar="RUN_DIR", help="only remake the report from a run's records.jsonl "
                    "and run.json (the phases as run)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.reanalyse:
        run = json.loads((Path(a.reanalyse) / "run.json").read_text())
        records = [json.loads(x) for x in (Path(a.reanalyse) / "records.jsonl").read_text().splitlines() if x]
        finish(records, run, out)
        return
    run_dir = Path(os.environ.get("FAIR_RUN_DIR") or f"/tmp/fairness-{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    engine = None
    try:
        url = a.engine_url
        if not url:
            from deploy.local import engines

            engines.ensure_ready()
            port = free_port()
            engine = engines.start_chat_engine(port, lora=False, extra_args=ENGINE_ARGS)
            url = f"http://127.0.0.1:{port}"
            engines.wait_healthy(url, timeout=900, proc=engine)
        cfg_path = run_dir / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(gateway_config(url, a.slo_ms, run_dir / "requests.jsonl")))
        gport = free_port()
        env = {**os.environ, "GATEWAY_STATE_DIR": str(run_dir / "state")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        gw = subprocess.Popen([PY, "-m", "gateway", "serve", "--config", str(cfg_path), "--port", str(gport),
                               "--workers", "1", "--log-level", "warning"], cwd=ROOT, env=env)
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{gport}/healthz", timeout=60, proc=gw)
        records_path = run_dir / "records.jsonl"
        duration = a.phase_s * a.phases
        t0 = time.time() + 3  # users are spawned within the first seconds
        users = a.flood_users + 4 + 1
        cmd = [PY, "-m", "locust", "-f", str(ROOT / "loadtests" / "fairness_locust.py"), "--headless",
               "--host", f"http://127.0.0.1:{gport}", "-u", str(users), "-r", str(users), "-t", f"{duration + 3:.0f}s",
               "--stop-timeout", "0", "--only-summary"]
        lenv = {**os.environ, "PYTHONPATH": str(ROOT), "FAIR_T0": str(t0), "FAIR_PHASE_S": str(a.phase_s),
                "FAIR_PACE_S": str(a.pace_s), "FAIR_KEYS": json.dumps(KEYS), "FAIR_RECORDS": str(records_path),
                "FAIR_FLOOD_USERS": str(a.flood_users)}
        with open(run_dir / "locust.log", "wb") as log:
            subprocess.run(cmd, cwd=ROOT, env=lenv, stdout=log, stderr=subprocess.STDOUT, timeout=duration + 300,
                           check=False)
        records = [json.loads(x) for x in records_path.read_text().splitlines() if x.strip()]
        run = {"t0": t0, "command": "python -m loadtests.fairness " + shlex.join(sys.argv[1:]),
               "phase_s": a.phase_s, "phases": a.phases, "settle_s": a.settle_s, "slo_ms": a.slo_ms,
               "pace_s": a.pace_s, "flood_users": a.flood_users, "run_dir": str(run_dir)}
        (run_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        finish(records, run, out)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if engine is not None:
            from deploy.local import engines

            engines.stop(engine)


if __name__ == "__main__":
    main()
