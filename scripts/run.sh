#!/usr/bin/env bash
# Run the gateway with its embedded default: the local CPU stack (real vLLM engines serving SmolLM2
# with a LoRA adapter and MiniLM embeddings, Redis, the gateway on http://127.0.0.1:8000).
# First run prepares the engine venv and the models (~10 min); later runs start in about a minute.
# Ctrl-C stops everything. To front your own vLLM instead:
#   VLLM_URL=http://host:8000 VLLM_MODEL=name .venv/bin/gateway serve --config deploy/examples/single-vllm.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
[ -x "$VENV/bin/gateway" ] || ensure_venv ""
exec "$VENV/bin/python" -m deploy.local.stack up "$@"
