#!/usr/bin/env bash
# The README's main-job command: installs treeopt into .venv (offline apart from the package
# registry) and searches the optimal tree for a shipped profile: writes the growmap, draws it,
# prints expected tokens per step and the predicted speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TREEOPT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e . 
export MPLBACKEND=Agg
"$VENV/bin/treeopt" search --profile profiles/sequoia-reference-l40-7b.json \
    --max-size 128 --max-levels 12 \
    --out growmaps/sequoia-l40-7b.pt --picture growmaps/sequoia-l40-7b.png
