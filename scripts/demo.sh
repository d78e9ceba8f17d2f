#!/usr/bin/env bash
# The main job: set up, then STAR-pretrain and fine-tune a small Vision Mamba on Fashion-MNIST (CPU, ~10 min),
# print the test accuracy and draw next-cluster predictions to runs/demo/predictions.png.
#   bash scripts/demo.sh [--download] [OUTPUT_DIR]
# The data is looked for before the set-up (minutes); --download fetches it with torchvision after it.
set -euo pipefail
cd "$(dirname "$0")/.."
download=""
if [ "${1:-}" = "--download" ]; then download=1; shift; fi
if [ -z "$download" ] && ! "${PYTHON:-python3}" src/star/data/fashion_mnist_files.py > /dev/null; then
  echo "or let the demo fetch it (needs a network): bash scripts/demo.sh --download" >&2
  exit 1
fi
bash scripts/setup.sh
if [ -n "$download" ]; then .venv/bin/star download fashion-mnist; fi
.venv/bin/star demo --output_dir "${1:-runs/demo}"
