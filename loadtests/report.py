"""Report of one load-test run: Markdown plus PNG plots, from the per-request records and locust's CSV.

    python -m loadtests.report RUN_DIR      # reads RUN_DIR/records.jsonl, RUN_DIR/locust_stats.csv, meta.json

Plots: latency percentiles over time (end to end, and time to first token by served model), throughput
and tokens/s, fallback and cache-hit rates over time, cost per 1k requests by served model.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

# Fallbacks forced by trouble (as GatewayFallbackRatioHigh counts them); task, context-length and
# budget-pressure routing are policy, not fallbacks
FALLBACK_RULES = {"overload", "failure_fallback", "deadline"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_fallback(r: dict[str, Any]) -> bool:
    return r.get("rule") in FALLBACK_RULES


def summarise(records: list[dict[str, Any]], duration_s: float | None = None) -> dict[str, Any]:
    """The run's figures (also what the summary line and the tests read)."""
    if not records:
        return {"requests": 0}
    t0 = min(r["t"] for r in records)
    t1 = max(r["t"] + r.get("e2e_ms", 0) / 1e3 for r in records)
    span = duration_s or max(1e-9, t1 - t0)
    ok = [r for r in records if r["ok"]]
    e2e = [r["e2e_ms"] for r in ok]
    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    gen = [r for r in ok if r.get("kind") != "embed"]
    cached = [r for r in ok if r.get("cache") in ("hit", "miss")]
    by_model: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "cost_usd": 0.0, "tokens": 0})
    for r in ok:
        m = by_model[r.get("served_model") or "none"]
        m["requests"] += 1
        m["cost_usd"] += r.get("cost_usd") or 0.0
        m["tokens"] += int(r.get("completion_tokens") or 0)
    for m in by_model.values():
        m["cost_per_1k_usd"] = m["cost_usd"] / m["requests"] * 1000
    errors: dict[str, int] = defaultdict(int)
    for r in records:
        if not r["ok"]:
            errors[r.get("error") or "?"] += 1
    total_cost = sum(r.get("cost_usd") or 0.0 for r in ok)
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "error_kinds": dict(errors),
        "duration_s": span, "rps": len(ok) / span,
        "tokens_per_s": sum(r.get("completion_tokens") or 0 for r in ok) / span,
        "e2e_p50_ms": pct(e2e, 50), "e2e_p95_ms": pct(e2e, 95), "e2e_p99_ms": pct(e2e, 99),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "fallback_rate": sum(is_fallback(r) for r in gen) / max(1, len(gen)),
        "cache_hit_rate": (sum(r.get("cache") == "hit" for r in cached) / len(cached)) if cached else None,
        "saved_usd": sum(r.get("saved_usd") or 0.0 for r in ok if r.get("cache") == "hit"),
        "cost_usd": total_cost, "cost_per_1k_usd": total_cost / max(1, len(ok)) * 1000,
        "by_model": dict(by_model),
    }


def summary_line(name: str, s: dict[str, Any]) -> str:
    if not s.get("requests"):
        return f"{name}: no requests"
    hit = "n/a" if s["cache_hit_rate"] is None else f"{s['cache_hit_rate']:.0%}"
    return (f"{name}: {s['ok']}/{s['requests']} ok, {s['errors']} errors, {s['rps']:.1f} req/s, "
            f"{s['tokens_per_s']:.0f} tok/s, e2e p50/p99 {s['e2e_p50_ms']:.0f}/{s['e2e_p99_ms']:.0f} ms, "
            f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms, fallbacks {s['fallback_rate']:.0%}, "
            f"cache hits {hit} (saved ${s['saved_usd']:.4f}), ${s['cost_per_1k_usd']:.4f} per 1k requests")


def _buckets(records: list[dict[str, Any]], width: float) -> tuple[float, dict[int, list[dict[str, Any]]]]:
    t0 = min(r["t"] for r in records)
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[int((r["t"] + r.get("e2e_ms", 0) / 1e3 - t0) // width)].append(r)  # by completion time
    return t0, out


def user_counts(out_dir: Path, t0: float) -> tuple[list[float], list[int]]:
    """Locust's user count over time (from its --csv-full-history file), seconds since the first request."""
    xs, ys = [], []
    for r in locust_rows(out_dir / "locust_stats_history.csv"):
        if r.get("Name") == "Aggregated" and r.get("Timestamp", "").isdigit():
            xs.append(int(r["Timestamp"]) - t0)
            ys.append(int(r["User Count"]))
    return xs, ys


def plots(records: list[dict[str, Any]], out_dir: Path, events: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return []
    span = max(r["t"] + r.get("e2e_ms", 0) / 1e3 for r in records) - min(r["t"] for r in records)
    width = max(1.0, round(span / 30))
    _, b = _buckets(records, width)
    xs = sorted(b)
    t = [(i + 0.5) * width for i in xs]
    models = sorted({str(r["served_model"]) for r in records if r["ok"] and r.get("served_model")})
    written = []

    def mark(ax: Any) -> None:
        for e in events:
            ax.axvline(e["t"], color="red", linestyle=":", linewidth=1)
            ax.annotate(e["what"], (e["t"], 1), xycoords=("data", "axes fraction"), fontsize=7, color="red",
                        va="top", rotation=90)

    def save(fig: Any, axes: tuple[Any, ...], name: str) -> None:
        """Events marked and a grid on every axis, then the PNG."""
        for ax in axes:
            mark(ax)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        written.append(name)

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for p, style in ((50, "-"), (95, "--"), (99, ":")):
        a1.plot(t, [pct([r["e2e_ms"] for r in b[i] if r["ok"]], p) for i in xs], style, label=f"p{p}")
    a1.set_ylabel("end to end (ms)")
    a1.set_title(f"Latency percentiles over time ({width:.0f} s windows)")
    a1.legend()
    for m in models:
        for p, style in ((50, "-"), (99, ":")):
            a2.plot(t, [pct([r["ttft_ms"] for r in b[i] if r["ok"] and r.get("served_model") == m
                             and r.get("ttft_ms") is not None], p) for i in xs], style, label=f"{m} p{p}")
    a2.set_ylabel("time to first token (ms)")
    a2.set_xlabel("seconds since start")
    a2.legend(fontsize=8)
    save(fig, (a1, a2), "latency.png")

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a1.plot(t, [sum(r["ok"] for r in b[i]) / width for i in xs], label="ok")
    a1.plot(t, [sum(not r["ok"] for r in b[i]) / width for i in xs], color="red", label="errors")
    a1.set_ylabel("requests/s")
    a1.set_title("Throughput")
    a1.legend(loc="upper left")
    ux, uy = user_counts(out_dir, min(r["t"] for r in records))
    if ux:
        a1b = a1.twinx()
        a1b.plot(ux, uy, color="gray", linestyle="--", label="users")
        a1b.set_ylabel("users", color="gray")
        a1b.legend(loc="upper right")
    for m in models:
        a2.plot(t, [sum(r.get("completion_tokens") or 0 for r in b[i] if r["ok"] and r.get("served_model") == m)
                    / width for i in xs], label=m)
    a2.set_ylabel("completion tokens/s")
    a2.set_xlabel("seconds since start")
    a2.legend(fontsize=8)
    save(fig, (a1, a2), "throughput.png")

    fig, ax = plt.subplots(figsize=(9, 3.5))
    gen = {i: [r for r in b[i] if r["ok"] and r.get("kind") != "embed"] for i in xs}
    ax.plot(t, [sum(is_fallback(r) for r in gen[i]) / max(1, len(gen[i])) for i in xs], label="fallback share")
    cache = {i: [r for r in b[i] if r["ok"] and r.get("cache") in ("hit", "miss")] for i in xs}
    if any(cache.values()):
        ax.plot(t, [sum(r.get("cache") == "hit" for r in cache[i]) / len(cache[i]) if cache[i] else math.nan
                    for i in xs], label="cache hit ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of requests")
    ax.set_xlabel("seconds since start")
    ax.set_title("Fallbacks and cache hits")
    ax.legend()
    save(fig, (ax,), "rates.png")

    s = summarise(records)
    names = sorted(s["by_model"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [s["by_model"][n]["cost_per_1k_usd"] for n in names])
    ax.set_ylabel("USD per 1k requests")
    ax.set_title("Cost per 1k requests by served model (gateway-reported)")
    fig.tight_layout()
    fig.savefig(out_dir / "cost.png", dpi=90)
    plt.close(fig)
    written.append("cost.png")
    return written


def locust_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def write_report(run_dir: Path) -> dict[str, Any]:
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
    records = load_records(run_dir / "records.jsonl")
    s = summarise(records)
    name = meta.get("scenario", run_dir.name)
    t0 = min((r["t"] for r in records), default=0.0)
    events = [{**e, "t": e["at"] - t0} for e in meta.get("events", [])]
    figs = plots(records, run_dir, events)
    line = summary_line(f"{name} ({meta.get('target', '?')})", s)
    md = [f"# Load test: {name}", "", f"**Summary:** {line}", ""]
    if meta:
        md += [f"- target: `{meta.get('target')}`, users: {meta.get('users')}, duration: {meta.get('duration')} s, "
               f"seed: {meta.get('seed')}", f"- command: `{meta.get('command', '')}`"]
        md += [f"- at {e['t']:.0f} s: {e['what']}" for e in events]
        if len(meta.get("requests_per_replica") or []) > 1:
            md.append(f"- requests per gateway replica: {meta['requests_per_replica']}")
        if meta.get("gateway_peak_rss_mib"):
            md.append(f"- gateway peak RSS (MiB): {[round(m or 0, 1) for m in meta['gateway_peak_rss_mib']]}")
        if meta.get("notes"):
            md.append(f"- {meta['notes']}")
        md.append("")
    if s.get("requests"):
        md += ["| served model | requests | completion tokens | cost (USD) | USD per 1k requests |",
               "|---|---|---|---|---|"]
        for m, v in sorted(s["by_model"].items()):
            md.append(f"| {m} | {v['requests']} | {v['tokens']} | {v['cost_usd']:.6f} | {v['cost_per_1k_usd']:.6f} |")
        md.append("")
        if s["error_kinds"]:
            md += ["Errors seen by clients: " + ", ".join(f"{k}: {v}" for k, v in s["error_kinds"].items()), ""]
    rows = [r for r in locust_rows(run_dir / "locust_stats.csv") if r.get("Name") != "Aggregated"]
    if rows:
        md += ["## Locust statistics (custom rows: TTFT/TPOT/E2E ms, TOKENS count, COST/SAVED micro-USD)", "",
               "| type | name | count | failures | median | p95 | p99 | average |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['Type']} | {r['Name']} | {r['Request Count']} | {r['Failure Count']} | "
                      f"{r['Median Response Time']} | {r.get('95%', '')} | {r.get('99%', '')} | "
                      f"{float(r['Average Response Time']):.1f} |")
        md.append("")
    for f in figs:
        md += [f"![{f[:-4]}]({f})", ""]
    md += ["Files: `records.jsonl` (one line per request), `locust_stats.csv`, `locust_stats_history.csv`, "
           "`locust_failures.csv`, `locust.html` (locust's own report).", ""]
    (run_dir / "report.md").write_text("\n".join(md))
    (run_dir / "summary.json").write_text(json.dumps({"scenario": name, "line": line, **s}, indent=2, default=str))
    return {"line": line, **s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    a = ap.parse_args()
    print(write_report(a.run_dir)["line"])


if __name__ == "__main__":
    main()
