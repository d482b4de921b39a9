#!/usr/bin/env bash
# Run the gateway in front of the vLLM named by VLLM_URL / VLLM_MODEL (deploy/examples/single-vllm.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GATEWAY_VENV:-.venv}
if [ ! -x "$VENV/bin/gateway" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING: Location' || true
fi
: "${VLLM_URL:?set VLLM_URL to your vLLM server, e.g. http://127.0.0.1:8101}"
: "${VLLM_MODEL:?set VLLM_MODEL to the model name it serves}"
exec "$VENV/bin/gateway" serve --config deploy/examples/single-vllm.yaml --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
