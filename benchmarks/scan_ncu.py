"""The Triton scan's kernels under Nsight Compute (ncu), to see what bounds them before changing them.

On a GPU machine, one forward+backward at a mixer shape (after warm-up launches that ncu skips):

    ncu --kernel-name regex:_scan_bwd_kernel --launch-skip 3 --launch-count 1 --set full --csv --page details \
        --log-file ncu_scan_bwd.csv python benchmarks/scan_ncu.py --d 768 --length 640
    python benchmarks/scan_ncu.py --render ncu_scan_bwd.csv > ncu_scan_bwd.md

--render turns ncu's details page (CSV: one row per metric) into a markdown table per kernel and section.
The shape's tokens (batch x length) are benchmarks/scan.py's, so the kernel is the one scan.py times.
"""
import argparse
import csv
import io
import sys
from pathlib import Path

from scan import D_STATE, TOKENS, scan_inputs


def launch(d: int, length: int, repeats: int) -> None:
    """`repeats` forward+backward passes of the Triton scan (bf16), each one launch of each scan kernel."""
    import torch

    from star.ops import selective_scan

    inputs = {k: v.requires_grad_() for k, v in scan_inputs(TOKENS // length, length, d, D_STATE).items()}
    grad = None
    for _ in range(repeats):
        y = selective_scan(**inputs, impl="triton")
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad)
    torch.cuda.synchronize()


def render(path: Path) -> str:
    """Markdown tables of an ncu `--csv --page details` file (ncu's own log lines before the header skipped)."""
    text = path.read_text()
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"{path}: no ncu CSV header (\"ID\",...) found; did ncu profile any kernel?")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    lines, seen = [], None
    for row in rows:
        kernel = (row["ID"], row["Kernel Name"], row.get("Block Size", ""), row.get("Grid Size", ""))
        if kernel != seen:
            seen, section = kernel, None
            lines += ["", f"### {row['Kernel Name'][:80]} (launch {row['ID']}, block {kernel[2]}, grid {kernel[3]})"]
        if row["Section Name"] != section:
            section = row["Section Name"]
            lines += ["", f"**{section}**", "", "| metric | unit | value |", "|---|---|---|"]
        lines.append(f"| {row['Metric Name']} | {row['Metric Unit']} | {row['Metric Value']} |")
    return "\n".join(lines).lstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=768, help="channels (768: star_base)")
    parser.add_argument("--length", type=int, default=640, help="sequence length (640: K=4 at 160 tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="forward+backward passes (ncu skips the first)")
    parser.add_argument("--render", type=Path, help="print this ncu details CSV as markdown instead")
    args = parser.parse_args(argv)
    if args.render:
        sys.stdout.write(render(args.render))
        return 0
    launch(args.d, args.length, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
