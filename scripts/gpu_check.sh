#!/usr/bin/env bash
# treeopt's GPU check in one command, under 8 minutes, offline: CUDA tests, engine exactness
# on the GPU, latency profiles of random-weight models of real sizes, the engine's overhead
# per step and the tree-attention benchmark (FlexAttention included), all written to one
# folder named after the GPU (see scripts/gpu_check.py; its options pass through, e.g.
# --out DIR, --sections latency,engine, --budget 300).
#
# Without a CUDA GPU it says so and exits 0 having done nothing. The Python used is $PYTHON,
# else the project's .venv, else python3, whichever first has torch with CUDA.
set -u
cd "$(dirname "$0")/.." || exit 1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi is missing or lists no GPU); nothing done"
    exit 0
fi
PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
            >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: a GPU is listed but no Python here has torch with CUDA (set PYTHON=...);" \
         "nothing done"
    exit 0
fi
nvidia-smi -L
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The Python script keeps to its own budget (450 s by default); this is the hard stop.
exec timeout --signal=INT --kill-after=10 475 "$PY" scripts/gpu_check.py "$@"
