#!/usr/bin/env bash
# Create .venv (once) with PyTorch and star installed; safe to rerun. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "== installing PyTorch (a few minutes the first time)"
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
echo "== installing star"
.venv/bin/pip install -q -e ".[test]"
