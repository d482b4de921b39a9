#!/usr/bin/env bash
# The project's test command (README, CI): installs what it needs, starts the services, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh
ensure_venv "test,load"

# Real Redis: the one on 127.0.0.1:6379, or one we start (tests that need a private one start their own).
if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server"
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi

# The scale-out stack's real parts (tests/test_scaleout.py, the replicas load test): HAProxy in front of
# gateway replicas, Redis Sentinel for failover (Debian's haproxy and redis-sentinel packages).
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}") >/dev/null
fi

# Real Prometheus and promtool (Debian's prometheus package) for the dashboard and alert-rule tests;
# Alertmanager (and amtool) and redis_exporter for alert delivery (tests/test_alert_delivery.py) and the
# scale-out stack's monitoring.
missing=()
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
command -v prometheus-redis-exporter >/dev/null || missing+=(prometheus-redis-exporter)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}") >/dev/null
fi

echo "== lint and type checks"
"$VENV/bin/ruff" check gateway tests loadtests dashboards deploy
"$VENV/bin/mypy" gateway

echo "== running the tests"
exec "$VENV/bin/python" -m pytest "$@"
