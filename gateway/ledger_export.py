"""`gateway ledger-export`: the ledger of a config's Redis or SQLite file, written out as JSON lines or CSV."""

from __future__ import annotations

import asyncio
import sys

from gateway.config import ConfigError, load_config
from gateway.ledger import Ledger, build_ledger_backend, parse_time
from gateway.store import RedisStore, StoreUnavailable


def export_command(config_path: str, fmt: str, out_path: str, start: str | None, end: str | None,
                   tenant: str | None) -> int:
    """`gateway ledger-export`: read the ledger of the config's Redis or SQLite file and write it out."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    r = cfg.features.redis
    if not r.url and cfg.features.ledger.path == "memory":
        print("gateway ledger-export: ledger.path is 'memory' (the ledger lives only inside a running gateway; "
              "use GET /v1/usage)", file=sys.stderr)
        return 2

    def on_error(op: str, e: BaseException) -> None:
        print(f"ledger {op} failed: {e}", file=sys.stderr)

    async def run() -> int:
        store = RedisStore(r.url, r.key_prefix, max(r.timeout_s, 5.0), 0.0, r.ledger_stream, None,
                           on_error) if r.url else None
        backend = build_ledger_backend(cfg, store)
        ledger = Ledger(backend, 1, 1.0, lambda n: None, lambda n: None)
        try:
            if out_path == "-":
                return await ledger.export(sys.stdout, fmt, parse_time(start), parse_time(end), tenant)
            with open(out_path, "w", newline="") as f:
                return await ledger.export(f, fmt, parse_time(start), parse_time(end), tenant)
        finally:
            await backend.close()

    try:
        n = asyncio.run(run())
    except StoreUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{n} records", file=sys.stderr)
    return 0
