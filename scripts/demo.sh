#!/usr/bin/env bash
# The main job: set up, then STAR-pretrain and fine-tune a small Vision Mamba on Fashion-MNIST (CPU, ~10 min),
# print the test accuracy and draw next-cluster predictions to runs/demo/predictions.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/star demo --output_dir "${1:-runs/demo}"
