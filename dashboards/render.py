"""Draws each dashboard's panels from a Prometheus to PNG (matplotlib), to look at a change without Grafana.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --out docs/img/ [--minutes 15]

One PNG per dashboard (dashboards/<name>.json -> <out>/<name>.png), panels laid out as in Grafana's grid.
Template variables take their "All" value; $__rate_interval is --rate-interval, $__range the whole window.
A panel whose queries return nothing is drawn with "NO DATA" in red.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

DASHBOARDS = Path(__file__).resolve().parent
UNIT_LABEL = {"s": "seconds", "reqps": "requests/s", "percentunit": "ratio", "currencyUSD": "USD", "short": ""}


def substitute(expr: str, dashboard: dict[str, Any], rate_interval: str, range_s: int) -> str:
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            expr = expr.replace(f"${v['name']}", v.get("allValue") or ".*")
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", f"{range_s}s")


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step},
                  timeout=60)
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return list(body["data"]["result"])


def render(dashboard: dict[str, Any], prom: str, start: float, end: float, out: Path, rate_interval: str) -> None:
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24, rows * 0.62))
    grid = fig.add_gridspec(rows, 24, hspace=1.4, wspace=1.6, top=0.97, bottom=0.02, left=0.03, right=0.99)
    step = max(1.0, (end - start) / 300)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] + 1:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=11, loc="left")
        unit = p["fieldConfig"]["defaults"].get("unit", "short")
        n = 0
        for t in p["targets"]:
            expr = substitute(t["expr"], dashboard, rate_interval, int(end - start))
            for s in query_range(prom, expr, start, end, step)[:12]:
                xs: list[Any] = [datetime.fromtimestamp(float(x)) for x, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                if p["type"] == "bargauge":
                    ax.barh(legend(t.get("legendFormat", ""), s["metric"]), ys[-1])
                else:
                    ax.plot(xs, ys, linewidth=1.2, label=legend(t.get("legendFormat", ""), s["metric"]))
                n += 1
        if n == 0:
            ax.text(0.5, 0.5, "NO DATA", color="red", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        elif p["type"] != "bargauge":
            ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.6)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.set_ylabel(UNIT_LABEL.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(dashboard["title"], fontsize=16, x=0.01, y=0.995, ha="left")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("--minutes", type=float, default=15, help="time window ending now")
    p.add_argument("--end", type=float, default=None, help="end of the window (unix time; default now)")
    p.add_argument("--rate-interval", default="1m")
    p.add_argument("--dashboard", action="append", help="only these (file names); default all")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    end = args.end or time.time()
    start = end - args.minutes * 60
    for path in sorted(DASHBOARDS.glob("*.json")):
        if args.dashboard and path.name not in args.dashboard:
            continue
        target = args.out / path.with_suffix(".png").name
        render(json.loads(path.read_text()), args.prometheus.rstrip("/"), start, end, target, args.rate_interval)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
