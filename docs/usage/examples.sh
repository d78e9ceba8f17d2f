#!/usr/bin/env bash
# Runs every `star` subcommand once on Fashion-MNIST (short runs: --max_steps) and keeps the output in
# docs/usage/output.txt, which docs/usage.md quotes. Run from the repo root: bash docs/usage/examples.sh
set -uo pipefail
out=docs/usage/output.txt
runs=$(mktemp -d)
: > "$out"
. docs/usage/show.sh
show star configs
show star pretrain --config fmnist-demo --output_dir "$runs/pre" --max_steps 40 --log_every 10
show star visualize "$runs/pre" --out "$runs/pre/predictions.png"
show star finetune --config fmnist-demo --pretrained "$runs/pre" --output_dir "$runs/ft" --max_steps 40 --log_every 10
show star linprobe --config fmnist-demo --pretrained "$runs/pre" --output_dir "$runs/lp" --max_steps 20 --log_every 10
show star eval "$runs/ft" --split test
python - "$runs" <<'PY'
import sys  # two test images as PNG files for `star predict`
from star.data import FashionMNIST
ds = FashionMNIST(split="test")
for i in (0, 1):
    ds[i][0].save(f"{sys.argv[1]}/test{i}.png")
PY
show star predict "$runs/ft" "$runs/test0.png" "$runs/test1.png" --topk 3
show star pretrain --config fmnist-demo --optim.blrr 1e-3
show star pretrain --config fmnist-demo --model.separator dots
show star finetune --config fmnist-demo --optim.smoothing 1.5
show star shards --help
rm -rf "$runs"
