#!/usr/bin/env bash
# Create .venv and install megatron_lite with its test extras, never pulling a CUDA build of torch.
# torch goes in first, pinned: on this project's CPU machines `pip install torch==2.13.0` is served
# locally; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU) or your CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" --index-url "$TORCH_INDEX"
else
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "installed: $(.venv/bin/python -c 'import torch, megatron_lite; print("torch", torch.__version__, "| megatron_lite", megatron_lite.__version__)')"
