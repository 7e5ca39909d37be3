#!/usr/bin/env bash
# fluxguide's two entry points. Each installs what it needs into ./.venv first (idempotent).
#   bash run.sh main [script options]   the main job (experiments/compare.py: every algorithm, compared)
#   bash run.sh test [pytest options]   the test suite
#   bash run.sh bench [NAME [options]]  benchmarks/NAME.py (all of them by default)
#   bash run.sh py SCRIPT [options]     any script with the project's environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.fluxguide-install-stamp"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
# Never reach a model hub at run time: every weight is local or built in code.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
cmd=${1:-}
shift || true
case "$cmd" in
  main) exec "$VENV/bin/python" experiments/compare.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    if [ $# -gt 0 ]; then
      name=$1; shift; exec "$VENV/bin/python" "benchmarks/$name.py" "$@"
    fi
    for f in benchmarks/*.py; do echo "== $f"; "$VENV/bin/python" "$f"; done ;;
  py) exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: bash run.sh {main|test|bench|py} [options]" >&2; exit 2 ;;
esac
