#!/usr/bin/env bash
# GPU tests: the Triton kernels compiled, at larger shapes than the CPU interpreter runs, fused AdamW, and
# training with CUDA graphs (--compile_mode reduce-overhead).
# Usage: scripts/gpu-tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/gpu-tests.sh: no CUDA device visible to torch" >&2
    exit 1
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest tests/test_triton.py tests/test_training.py::test_fused_adamw_on_cuda_matches_foreach \
    tests/test_cli.py::test_cuda_graph_compile_trains_like_eager_on_cuda -q -p no:cacheprovider "$@"
