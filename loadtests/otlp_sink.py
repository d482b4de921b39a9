"""An OTLP/HTTP trace receiver for the tests and the benchmark: decodes exports with opentelemetry-proto's types.

The gateway's and vLLM's exporters post real OTLP (protobuf over HTTP) here, exactly as they would to an
OpenTelemetry Collector. (A Collector is not installable here: it builds only with Go >= 1.24, and Debian 12
ships Go 1.19; docs/tracing.md.) Spans are kept flattened, with ids as hex and attributes as Python values.

    python -m loadtests.otlp_sink --port 4318 [--count-only]    # the benchmark's receiver (prints span counts)
    python -m loadtests.otlp_sink --port 4318 --file traces.jsonl  # the local stack's: one JSON line per span
"""

from __future__ import annotations

import argparse
import gzip
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class SpanData:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int  # 1 internal, 2 server, 3 client
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    service: str
    resource: dict[str, Any] = field(default_factory=dict)


class OtlpSink:
    """POST /v1/traces on 127.0.0.1:<port>; `spans` holds every span received, in arrival order."""

    def __init__(self, port: int = 0, keep: bool = True, file: str | None = None) -> None:
        self.spans: list[SpanData] = []
        self.posts = 0
        self.received = 0  # spans, kept or not
        self.keep = keep  # False: decode and count only (a long benchmark would fill memory)
        self.file = open(file, "ab") if file else None  # noqa: SIM115 - lives as long as the sink
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                sink._receive(ExportTraceServiceRequest.FromString(raw))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, req: ExportTraceServiceRequest) -> None:
        if not self.keep and self.file is None:
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with self._lock:
                self.received += n
                self.posts += 1
            return
        got = []
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(SpanData(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                        s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                        {a.key: _value(a.value) for a in s.attributes},
                        [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in s.events],
                        str(resource.get("service.name", "")), resource))
        with self._lock:
            if self.keep:
                self.spans.extend(got)
            if self.file is not None:
                self.file.write(b"".join(orjson.dumps(asdict(s)) + b"\n" for s in got))
                self.file.flush()
            self.received += len(got)
            self.posts += 1

    def trace(self, trace_id: str) -> list[SpanData]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, found: Callable[[list[SpanData]], bool], timeout: float = 30.0) -> list[SpanData]:
        """Spans received so far, once `found` accepts them (AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if found(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"spans not received within {timeout:g}s; received: {names}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.file is not None:
            self.file.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="OTLP/HTTP trace receiver (POST /v1/traces)")
    ap.add_argument("--port", type=int, default=4318)
    ap.add_argument("--count-only", action="store_true", help="decode and count the spans, keep none")
    ap.add_argument("--file", help="append each span as a JSON line here (like the Collector's file exporter)")
    a = ap.parse_args()
    sink = OtlpSink(a.port, keep=False, file=a.file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        print(f"otlp_sink: {sink.received} spans in {sink.posts} exports", file=sys.stderr, flush=True)
        sink.close()


if __name__ == "__main__":
    main()
