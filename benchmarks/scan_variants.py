"""Time the Triton scan of several source trees against each other, on one GPU, in one run.

    python benchmarks/scan_variants.py --trees main=. prefetch=../other-checkout [--out docs/benchmarks]

Each tree (a copy of star, e.g. `git archive <branch>` unpacked; name it with its commit) is imported in its
own child process with its `src` first on PYTHONPATH, and times `selective_scan(impl="triton")` forward and
forward+backward at the shapes of `benchmarks/scan.py` (tiny and base widths, lengths 160/640/2560, same
tokens per batch) with the tree's own CUDA_CONFIG. A tree whose CUDA_CONFIG has PART_PROGRAMS (splitting long
sequences into parts) is also timed at each --part-programs value. The first tree is timed again at the end,
so drift of the card shows. Writes scan_variants.json (the run's commit; every row with its tree and config)
and scan_variants.md into --out. `--ops conv` (or `--ops scan conv`) times each tree's Triton conv1d (k=4, bias,
SiLU) at the same shapes instead (as well).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from star.training.provenance import git_commit
from outputs import write_outputs
from scan import (D_STATE, LENGTHS, MODELS, TOKENS, conv_bytes, conv_fn, copy_bandwidth, scan_bytes, scan_fn,
                  scan_inputs, timing_cells, try_time)


def time_tree(name: str, part_programs: list, ops: list) -> list:
    """Child process: time what `ops` names (scan, conv) of the star that is first on PYTHONPATH."""
    from star.ops.triton import selective_scan as triton_scan_module

    config = triton_scan_module.CUDA_CONFIG
    parts = [config["PART_PROGRAMS"], *part_programs] if "PART_PROGRAMS" in config else [None]
    bandwidth = copy_bandwidth()
    rows = []
    settings = [("scan", part) for part in dict.fromkeys(parts)] if "scan" in ops else []  # the tree's own first
    settings += [("conv", None)] if "conv" in ops else []  # the tree's Triton conv (k=4, bias, SiLU)
    for op, part in settings:
        if part is not None:
            config["PART_PROGRAMS"] = part
        for model, d in MODELS.items():
            for l in LENGTHS:
                b = TOKENS // l
                if op == "scan":
                    fn, floor_bytes = scan_fn("triton"), lambda backward: scan_bytes(b, l, d, D_STATE, 2, backward)
                    row = dict(tree=name, star_file=triton_scan_module.__file__, config=json.loads(json.dumps(config)))
                else:
                    fn, floor_bytes = conv_fn("triton", d), lambda backward: conv_bytes(b, l, d, 2, backward)
                    row = dict(tree=name, op="conv", config={})
                row.update(model=model, d=d, length=l, batch=b, bandwidth_tb_s=bandwidth / 1e12)
                for backward, key in ((False, "fwd"), (True, "fwd_bwd")):
                    ms = try_time(fn, scan_inputs(b, l, d, D_STATE), backward)
                    row[f"{key}_ms"] = ms
                    row[f"{key}_x_floor"] = ms / (floor_bytes(backward) / bandwidth * 1e3) if ms else None
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(meta, rows):
    """One row per tree, setting and shape; ms and multiple of the memory floor, forward and forward+backward."""
    ops = " and ".join(dict.fromkeys(r.get("op", "scan") for r in rows if "error" not in r)) or "scan"
    lines = [f"# Triton {ops}: source trees compared ({meta['device']}, {meta['date']})", "",
             f"`python benchmarks/scan_variants.py`, commit {meta['commit']}, torch {meta['torch']}; bf16, d_state "
             f"{D_STATE}, {TOKENS} tokens per batch; each tree with its own CUDA_CONFIG.", "",
             "| tree | op | PART_PROGRAMS | d | length | fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tree']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['tree']} | {r.get('op', 'scan')} | {r['config'].get('PART_PROGRAMS', '-')} | {r['d']} | "
                     f"{r['length']} | {timing_cells(r)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, metavar="NAME=PATH", help="checkouts of star to time")
    parser.add_argument("--part-programs", type=int, nargs="*", default=[0, 1024, 2048, 4096],
                        help="PART_PROGRAMS values to time, for trees that have the setting")
    parser.add_argument("--ops", nargs="+", choices=("scan", "conv"), default=["scan"],
                        help="what to time in every tree: the Triton scan, the Triton conv1d or both")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/scan_variants.py needs a CUDA GPU")
    if args.child:
        print(json.dumps(time_tree(args.child, args.part_programs, args.ops)))
        return
    trees = []
    for spec in args.trees:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "src" / "star").is_dir():
            raise SystemExit(f"--trees: {spec!r} is not NAME=PATH of a checkout with src/star")
        trees.append((name, Path(path).resolve()))
    rows = []
    for name, path in [*trees, (trees[0][0] + " (again)", trees[0][1])]:
        pythonpath = filter(None, [str(path / "src"), os.environ.get("PYTHONPATH")])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
        out = subprocess.run([sys.executable, __file__, "--child", name, "--trees", *args.trees, "--part-programs",
                              *map(str, args.part_programs), "--ops", *args.ops], env=env, stdout=subprocess.PIPE,
                             text=True)
        if out.returncode:  # e.g. a kernel this Triton cannot compile: say so, time the other trees
            rows.append(dict(tree=name, error=f"exit status {out.returncode}, see the child's stderr above"))
        else:
            rows += json.loads(out.stdout)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                commit=git_commit(), trees={name: str(path) for name, path in trees})
    write_outputs(args.out, "scan_variants", dict(meta=meta, rows=rows), markdown(meta, rows))


if __name__ == "__main__":
    main()
