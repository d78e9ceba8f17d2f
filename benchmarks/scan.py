"""Selective scan + causal conv1d speed on one GPU, against each kernel's memory floor.

    python benchmarks/scan.py [--out docs/benchmarks] [--sweep]

Measures the card's device-to-device copy bandwidth first (bytes read + written per second), then for the
tiny (d=192) and base (d=768) mixer shapes at lengths 160/640/2560 (batch = TOKENS // length) times forward
and forward+backward of: the Triton scan, the chunked PyTorch scan, the sequential reference scan (only at
the lengths listed in REF_LENGTHS: it launches a few kernels per time step), the Triton conv and PyTorch's
conv1d path. Each time is also given as a multiple of its memory floor: the bytes the op must move
(every input read once, every output written once; counted per kernel in `scan_bytes`/`conv_bytes`)
divided by the measured bandwidth. Writes scan.json and scan.md into --out.
"""
import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from star.ops import causal_conv1d, selective_scan
from star.ops.triton import selective_scan as triton_scan_module
from star.training.provenance import git_commit
from outputs import write_outputs

TOKENS = 131072  # batch * length for every shape
D_STATE = 16
MODELS = {"tiny": 192, "base": 768}
LENGTHS = (160, 640, 2560)
REF_LENGTHS = (160,)
# Tile candidates per direction (the forward is timed alone, the backward as forward+backward with the best
# forward), then the segment length (steps between saved states).
FWD_SWEEP = [dict(BLOCK_D=32, CHUNK=4, num_warps=1), dict(BLOCK_D=32, CHUNK=2, num_warps=1),
             dict(BLOCK_D=64, CHUNK=4, num_warps=2)]
BWD_SWEEP = [dict(BLOCK_D=32, CHUNK=2, num_warps=1), dict(BLOCK_D=32, CHUNK=4, num_warps=1),
             dict(BLOCK_D=64, CHUNK=2, num_warps=2)]
SEGMENT_SWEEP = (32, 64, 128)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def scan_bytes(b, l, d, n, act_bytes, backward):
    """Fewest bytes the scan must move: activations u, delta, z in and y out (forward); u, delta, z, dy in
    and du, ddelta, dz out plus B, C in and dB, dC out (backward); fp32 per-channel parameters ignored."""
    tokens = b * l
    fwd = tokens * (4 * d + 2 * n) * act_bytes
    bwd = tokens * (7 * d + 4 * n) * act_bytes
    return fwd + bwd if backward else fwd


def conv_bytes(b, l, d, act_bytes, backward):
    """Forward reads x, writes y; backward reads x and dy, writes dx (weights are negligible)."""
    return b * l * d * act_bytes * (5 if backward else 2)


def scan_inputs(b, l, d, n, dtype=torch.bfloat16):
    dev = "cuda"
    return dict(
        u=torch.randn(b, l, d, device=dev, dtype=dtype), delta=torch.randn(b, l, d, device=dev, dtype=dtype) - 1,
        A=-torch.rand(d, n, device=dev) * n, B=torch.randn(b, l, n, device=dev, dtype=dtype),
        C=torch.randn(b, l, n, device=dev, dtype=dtype), D=torch.ones(d, device=dev),
        z=torch.randn(b, l, d, device=dev, dtype=dtype), delta_bias=torch.randn(d, device=dev) * 0.5 - 3,
    )


def time_op(fn, inputs, backward):
    """Median ms of fn(**inputs) (forward) or of forward + backward with a fixed random grad_output."""
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(**inputs), return_mode="median")
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn_like(fn(**leaves))

    def step():
        for v in leaves.values():
            v.grad = None
        fn(**leaves).backward(grad_out)
    return do_bench(step, return_mode="median")


def try_time(fn, inputs, backward):
    try:
        return time_op(fn, inputs, backward)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def scan_fn(impl):
    return lambda **kw: selective_scan(**kw, impl=impl)


def conv_fn(impl, d):
    weight = torch.randn(d, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return lambda u, **_: causal_conv1d(u, weight, bias, activation="silu", impl=impl)


def sweep_configs(bandwidth):
    """Pick the scan tiles (forward, then backward, then segment length) that are fastest at base, l=640."""
    b, l, d = TOKENS // 640, 640, MODELS["base"]
    config = triton_scan_module.CUDA_CONFIG
    results = []
    for key, candidates, backward in (("fwd", FWD_SWEEP, False), ("bwd", BWD_SWEEP, True),
                                      ("SEGMENT", SEGMENT_SWEEP, True)):
        timed = []
        for candidate in candidates:
            config[key] = candidate
            ms = try_time(scan_fn("triton"), scan_inputs(b, l, d, D_STATE), backward)
            floor_ms = scan_bytes(b, l, d, D_STATE, 2, backward) / bandwidth * 1e3
            timed.append((ms, candidate))
            results.append(dict(key=key, config=candidate, fwd_bwd=backward, ms=ms, x_floor=ms / floor_ms if ms else None))
            print(f"sweep {key}={candidate} ({'fwd+bwd' if backward else 'fwd'}): {ms} ms", flush=True)
        config[key] = min((t for t in timed if t[0]), key=lambda t: t[0])[1]
    return results


def run(args):
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    sweep = sweep_configs(bandwidth) if args.sweep else []
    rows = []
    for model, d in MODELS.items():
        for l in args.lengths:
            b = TOKENS // l
            ops = [("scan", "triton", scan_fn("triton")), ("scan", "chunked", scan_fn("chunked")),
                   ("conv", "triton", conv_fn("triton", d)), ("conv", "torch", conv_fn("ref", d))]
            if l in REF_LENGTHS:
                ops.append(("scan", "ref", scan_fn("ref")))
            for op, impl, fn in ops:
                row = dict(model=model, d=d, length=l, batch=b, op=op, impl=impl)
                for backward, key in ((False, "fwd"), (True, "fwd_bwd")):
                    ms = try_time(fn, scan_inputs(b, l, d, D_STATE), backward)
                    nbytes = (scan_bytes(b, l, d, D_STATE, 2, backward) if op == "scan"
                              else conv_bytes(b, l, d, 2, backward))
                    floor_ms = nbytes / bandwidth * 1e3
                    row[f"{key}_ms"] = ms
                    row[f"{key}_floor_ms"] = floor_ms
                    row[f"{key}_x_floor"] = ms / floor_ms if ms else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    return bandwidth, sweep, rows


def timing_cells(row) -> str:
    """fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor of one row; "OOM" where try_time gave none."""
    cells = [(row["fwd_ms"], ".3f"), (row["fwd_x_floor"], ".2f"), (row["fwd_bwd_ms"], ".3f"),
             (row["fwd_bwd_x_floor"], ".2f")]
    return " | ".join("OOM" if x is None else format(x, spec) for x, spec in cells)


def markdown(meta, rows):
    lines = [f"# Selective scan / conv1d benchmark ({meta['device']}, {meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, bf16 activations, "
             f"d_state {D_STATE}, {TOKENS} tokens per batch, copy bandwidth {meta['bandwidth_tb_s']:.2f} TB/s "
             f"(read + write), scan tiles {meta['scan_config']}.", "",
             "| model | d | length | batch | op | impl | fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['d']} | {r['length']} | {r['batch']} | {r['op']} | {r['impl']} | "
                     f"{timing_cells(r)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--sweep", action="store_true", help="try several scan tile sizes first, keep the fastest")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/scan.py needs a CUDA GPU")
    bandwidth, sweep, rows = run(args)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
                bandwidth_tb_s=bandwidth / 1e12, scan_config=json.loads(json.dumps(triton_scan_module.CUDA_CONFIG)),
                tokens=TOKENS, d_state=D_STATE, ref_lengths=list(REF_LENGTHS))
    write_outputs(args.out, "scan", dict(meta=meta, sweep=sweep, rows=rows), markdown(meta, rows))


if __name__ == "__main__":
    main()
