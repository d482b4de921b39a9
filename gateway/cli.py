"""Command line: `gateway serve`, `gateway check-config` and `gateway ledger-export`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.server import HEADER_TIMEOUT_ENV


def _config_path(arg: str | None) -> str:
    path = arg or os.environ.get("GATEWAY_CONFIG")
    if not path:
        sys.exit("gateway: no config given: pass --config FILE or set GATEWAY_CONFIG")
    return str(Path(path).resolve())


def check_config(path: str) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    deployments = sum(len(m.deployments) for m in cfg.models.values())
    print(f"{path}: OK ({len(cfg.models)} models, {deployments} deployments, "
          f"{len(cfg.keys_by_sha256)} API keys, auth {'on' if cfg.auth_enabled else 'OFF'}, "
          f"/metrics {'needs server.metrics_key' if cfg.server.metrics_key else 'open'}, "
          f"/docs {'on' if cfg.server.docs and cfg.server.openapi else 'off'})")
    if cfg.auth_enabled and not cfg.server.metrics_key:
        print("note: /metrics answers without a key and names tenants, their spend and budgets; set "
              "server.metrics_key or keep /metrics off the public listener (docs/config.md)", file=sys.stderr)
    return 0


def shared_state_problem(cfg: GatewayConfig, workers: int) -> str | None:
    """Why `workers` processes cannot run this config without a shared store, or None.

    Without Redis the ledger is one SQLite file all workers share, but limits live in each process:
    N workers would each allow the full limit. Refused rather than silently multiplied."""
    f = cfg.features
    if workers <= 1 or f.redis.url:
        return None
    if f.tenant_limits or f.key_limits:
        return (f"--workers {workers} with rate limits or budgets needs a shared store: set redis.url, or run "
                "one worker per process (limits in the in-process backend are per worker)")
    if f.ledger.path == "memory":
        return (f"--workers {workers} with ledger.path 'memory' would split the ledger between workers: "
                "set redis.url, or leave ledger.path unset (a SQLite file all workers share)")
    return None


def serve(path: str, host: str, port: int, workers: int, log_level: str) -> int:
    try:
        cfg = load_config(path)  # fail fast, with the message, before any worker starts
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    problem = shared_state_problem(cfg, workers)
    if problem:
        print(f"gateway serve: {problem}", file=sys.stderr)
        return 2
    os.environ["GATEWAY_CONFIG"] = path
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before prometheus_client is imported by any worker.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    # Read by gateway.server in every worker: the deadline for a request's line and headers.
    os.environ[HEADER_TIMEOUT_ENV] = repr(cfg.server.header_timeout)
    import uvicorn

    uvicorn.run("gateway.app:create_app", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", http="gateway.server:HeaderDeadlineProtocol", access_log=False, log_level=log_level,
                timeout_keep_alive=30, limit_concurrency=cfg.server.max_connections,
                timeout_graceful_shutdown=math.ceil(cfg.server.shutdown_grace_s))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the gateway")
    s.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    c = sub.add_parser("check-config", help="validate a config file without serving")
    c.add_argument("file")
    e = sub.add_parser("ledger-export", help="write the usage ledger as JSONL or CSV (for billing)")
    e.add_argument("--config", help="YAML config file naming the Redis (default: $GATEWAY_CONFIG)")
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    e.add_argument("--start", help="unix seconds or ISO 8601 date/time (UTC), inclusive")
    e.add_argument("--end", help="unix seconds or ISO 8601 date/time (UTC), exclusive")
    e.add_argument("--tenant", help="only this tenant's records")
    e.add_argument("--out", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "ledger-export":
        from gateway.ledger_export import export_command

        return export_command(_config_path(args.config), args.format, args.out, args.start, args.end, args.tenant)
    return serve(_config_path(args.config), args.host, args.port, args.workers, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
