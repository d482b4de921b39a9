# Sourced by run.sh and test.sh: the project's virtual environment, created and filled on demand.
# ensure_venv EXTRAS  ->  $VENV has the gateway installed (editable) with those extras ("" for none).
VENV=${GATEWAY_VENV:-.venv}

ensure_venv() {
  local spec="."
  [ -n "$1" ] && spec=".[$1]"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  echo "== installing the gateway${1:+ and its $1 dependencies}"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec" 2>&1 | grep -v -E '^(WARNING: Location|\s*$)' || true
}
