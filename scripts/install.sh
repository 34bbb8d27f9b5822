#!/usr/bin/env bash
# Install wda into the current Python environment.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh test     # + test dependencies (pytest, transformers, peft, ...)
# torch: an existing install (e.g. a CUDA build on a GPU box) is left alone. Without one,
# torch==2.13.0 is installed; on our CPU machines pip resolves that pin to the local CPU
# wheel instead of gigabytes of CUDA wheels. Override with WDA_TORCH_SPEC="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "${WDA_TORCH_SPEC:-torch==2.13.0}"
fi
extra="${1:-}"
if [ -n "$extra" ]; then
    "$PY" -m pip install -q -e ".[$extra]"
else
    "$PY" -m pip install -q -e .
fi
"$PY" -c "import torch, wda; print(f'wda installed (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
