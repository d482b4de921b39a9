#!/usr/bin/env bash
# Run the gateway with its embedded default: the local CPU stack (real vLLM engines serving SmolLM2
# with a LoRA adapter and MiniLM embeddings, Redis, the gateway on http://127.0.0.1:8000).
# First run prepares the engine venv and the models (~10 min); later runs start in about a minute.
# Ctrl-C stops everything. To front your own vLLM instead:
#   VLLM_URL=http://host:8000 VLLM_MODEL=name .venv/bin/gateway serve --config deploy/examples/single-vllm.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GATEWAY_VENV:-.venv}
if [ ! -x "$VENV/bin/gateway" ]; then
  echo "[run] installing the gateway into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING: Location' || true
fi
exec "$VENV/bin/python" deploy/local/stack.py up "$@"
