#!/usr/bin/env bash
# Set up, then run the test suite (CPU; Triton kernels run under the Triton interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The GPU machine's Triton (3.6), beside the one torch brings: tests/test_triton.py compiles every kernel with it
# too, since its compiler refuses kernels that newer ones accept.
GPU_TRITON=.venv/triton-3.6.0
if [ ! -d "$GPU_TRITON/triton" ]; then
  echo "== installing Triton 3.6.0 into $GPU_TRITON (compile checks only)"
  .venv/bin/pip install -q --no-deps --target "$GPU_TRITON" "triton==3.6.0"
fi
.venv/bin/python -m pytest "$@"
