#!/usr/bin/env bash
# Triton kernel tests on a CUDA GPU: compiled kernels at larger shapes than the CPU interpreter run.
# Usage: scripts/gpu-tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/gpu-tests.sh: no CUDA device visible to torch" >&2
    exit 1
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest tests/test_triton.py -q -p no:cacheprovider "$@"
