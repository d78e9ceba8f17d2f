"""The Triton scan on long sequences in small batches: time per token against short sequences in large ones.

    python benchmarks/scan_long.py [--out docs/benchmarks/k_sweep] [--min-waves 0 2 4 8] [--parts-below-waves 1]

At the tiny (d=192) and base (d=768) widths, times forward and forward+backward of `selective_scan(impl=
"triton")` (bf16, d_state 16) at the sequence lengths of STAR's K sweep (K * 160 tokens for K = 1, 4, 16, 64,
128) with about 131k tokens per batch (batch = 819, 204, 51, 12 sequences) and with the 40,960 tokens of a
256-image pretraining step (256, 64, 16, 4, 2 sequences). Each shape runs once per `CUDA_CONFIG["MIN_WAVES"]` value
of --min-waves (how many waves the parts aim at; 0: never parallel over time, the scan before parts), with
launches of fewer than --parts-below-waves waves of programs cut into parts (`CUDA_CONFIG["PARTS_BELOW_WAVES"]`;
the committed k_sweep table used 4, the rule before 3f72642). Every time is also given per token relative to
the (819, 160) shape of the same setting and width. Writes scan_long.json and scan_long.md.
"""
import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

from star.ops.triton.selective_scan import CUDA_CONFIG
from star.ops.triton.selective_scan_parts import _parts
from star.training.provenance import git_commit
from outputs import write_outputs
from scan import D_STATE, MODELS, scan_fn, scan_inputs, try_time

# (batch, length): ~131k tokens (scan.py's shapes and the issue's), then 40,960 (train_step.py's 256 images
# at K = 1, 4, 16, 64, 128)
SHAPES = [(819, 160), (204, 640), (51, 2560), (12, 10240), (256, 160), (64, 640), (16, 2560), (4, 10240), (2, 20480)]


def run(min_waves):
    rows = []
    for waves in min_waves:
        CUDA_CONFIG["MIN_WAVES"] = waves
        for model, d in MODELS.items():
            base = None
            for b, l in SHAPES:
                inputs = scan_inputs(b, l, d, D_STATE)
                row = dict(min_waves=waves, model=model, d=d, batch=b, length=l, tokens=b * l,
                           parts_fwd=_parts(inputs["u"], d, "fwd")[0],
                           parts_bwd=_parts(inputs["u"], d, "bwd")[0])
                for backward, key in ((False, "fwd"), (True, "fwd_bwd")):
                    row[f"{key}_ms"] = try_time(scan_fn("triton"), inputs, backward)
                    row[f"{key}_ns_per_token"] = row[f"{key}_ms"] * 1e6 / (b * l) if row[f"{key}_ms"] else None
                base = base or row
                for key in ("fwd", "fwd_bwd"):
                    row[f"{key}_per_token_x_short"] = (row[f"{key}_ns_per_token"] / base[f"{key}_ns_per_token"]
                                                       if row[f"{key}_ms"] and base[f"{key}_ms"] else None)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(meta, rows):
    lines = [f"# Triton scan on long sequences ({meta['device']}, {meta['date']})", "",
             f"`python benchmarks/scan_long.py`, commit {meta['commit']}, torch {meta['torch']}, triton "
             f"{meta['triton']}; bf16, d_state {D_STATE}. Launches below {meta.get('parts_below_waves', 4):g} waves "
             f"run in parts aiming at MIN_WAVES waves; MIN_WAVES 0 = never parallel over time. 'x short' = time "
             f"per token over that of (819, 160) at the same width and setting.", "",
             "| MIN_WAVES | d | batch | length | parts fwd / bwd | fwd ms | fwd+bwd ms | fwd+bwd ns / token | "
             "fwd x short | fwd+bwd x short |", "|" + "---|" * 10]
    for r in rows:
        def cell(key, fmt):
            return format(r[key], fmt) if r.get(key) else "OOM"
        lines.append(f"| {r['min_waves']} | {r['d']} | {r['batch']} | {r['length']} | {r['parts_fwd']} / "
                     f"{r['parts_bwd']} | {cell('fwd_ms', '.3f')} | {cell('fwd_bwd_ms', '.3f')} | "
                     f"{cell('fwd_bwd_ns_per_token', '.3f')} | {cell('fwd_per_token_x_short', '.2f')} | "
                     f"{cell('fwd_bwd_per_token_x_short', '.2f')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/k_sweep"))
    parser.add_argument("--min-waves", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--parts-below-waves", type=float, default=CUDA_CONFIG["PARTS_BELOW_WAVES"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/scan_long.py needs a CUDA GPU")
    defaults = dict(CUDA_CONFIG)
    CUDA_CONFIG["PARTS_BELOW_WAVES"] = args.parts_below_waves
    try:
        rows = run(args.min_waves)
    finally:
        CUDA_CONFIG.update(defaults)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, commit=git_commit(),
                sms=torch.cuda.get_device_properties(0).multi_processor_count,
                config=json.loads(json.dumps(CUDA_CONFIG)), parts_below_waves=args.parts_below_waves)
    write_outputs(args.out, "scan_long", dict(meta=meta, rows=rows), markdown(meta, rows))


if __name__ == "__main__":
    main()
