#!/usr/bin/env bash
# Runs `star convert arm` and the dense-feature examples of docs/usage.md and keeps their output in
# docs/usage/arm_features.txt. No ARM weights can be downloaded where this ran, so the checkpoints are
# ARM-layout ones with random weights, made by the tests' helper (tests/test_convert.py), at a tiny size.
# Run from the repo root: bash docs/usage/arm_features.sh
set -uo pipefail
out=docs/usage/arm_features.txt
runs=$(mktemp -d)
: > "$out"
. docs/usage/show.sh
python - "$runs" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
from test_convert import arm_state_dict, save_arm
from pathlib import Path
runs = Path(sys.argv[1])
save_arm(runs, arm_state_dict("finetune", depth=2, grid=4, patch=4), "arm-ft.pth")
save_arm(runs, arm_state_dict("pretrain", depth=12, grid=12, patch=4), "arm-pre.pth")
sd = arm_state_dict("finetune", depth=2, grid=4, patch=4)
sd["layers.0.mixer.gamma"] = torch.ones(32)  # ARM's optional layer scale, which star does not have
save_arm(runs, sd, "arm-layerscale.pth")
PY
show python -m star --version
show star convert arm "$runs/arm-ft.pth" --out "$runs/arm-ft"
show star eval "$runs/arm-ft" --data.dataset synthetic --data.num_workers 0
show star convert arm "$runs/arm-pre.pth" --out "$runs/arm-pre"
show star finetune --config fmnist-tiny --pretrained "$runs/arm-pre" --output_dir "$runs/ft" --model.embed_dim 32 \
  --model.depth 12 --model.img_size 48 --model.patch_size 4 --model.in_chans 3 --data.mean_std imagenet \
  --data.dataset synthetic --data.num_samples 64 --data.val_size 16 --model.num_classes 10 --optim.batch_size 16 --max_steps 2
show star convert arm "$runs/arm-layerscale.pth" --out "$runs/x"
show python docs/usage/segmentation_head.py
rm -rf "$runs"
