#!/usr/bin/env bash
# STAR-B pretraining throughput on 1 and 2 GPUs (DDP) and the scaling efficiency, in one run.
# Usage: scripts/gpu-ddp.sh [OUT_DIR]   (needs 2 CUDA GPUs; writes OUT_DIR/ddp.jsonl and OUT_DIR/ddp.json)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/ddp-bench}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
for batch in 64 128; do  # images per GPU per step
    for gpus in 1 2; do
        timeout 180 torchrun --standalone --nproc_per_node "$gpus" benchmarks/ddp_throughput.py \
            --batch-size "$batch" --out "$out/ddp.jsonl" || echo "gpu-ddp.sh: $gpus GPU(s), batch $batch failed" >&2
    done
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = [json.loads(line) for line in open(f"{out}/ddp.jsonl")]
rows = []
for batch in sorted({r["batch_per_gpu"] for r in runs}):
    by_gpus = {r["gpus"]: r for r in runs if r["batch_per_gpu"] == batch}
    if 1 in by_gpus and 2 in by_gpus:
        speedup = by_gpus[2]["images_per_s"] / by_gpus[1]["images_per_s"]
        rows.append({"batch_per_gpu": batch, "speedup_2_gpus": speedup, "efficiency": speedup / 2})
json.dump({"runs": runs, "scaling": rows}, open(f"{out}/ddp.json", "w"), indent=1)
print(f"{'batch/GPU':>9} {'GPUs':>4} {'step ms':>8} {'img/s':>8} {'GiB':>5}")
for r in runs:
    print(f"{r['batch_per_gpu']:>9} {r['gpus']:>4} {r['step_ms']:>8.1f} {r['images_per_s']:>8.0f} {r['max_memory_gib']:>5.1f}")
for row in rows:
    print(f"batch {row['batch_per_gpu']}/GPU: 2 GPUs = {row['speedup_2_gpus']:.3f}x one GPU ({100 * row['efficiency']:.1f}% efficiency)")
PY
