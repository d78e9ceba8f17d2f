"""Source trees of the Triton scan backward with one named change each, for scan_variants.py to time side by side.

    python benchmarks/scan_trees.py DEST [NAME ...]      # default: every variant
    python benchmarks/scan_variants.py --trees main=. seg16=DEST/seg16 ...

Each tree is a copy of this tree's `src` with one edit, made by exact text replacement (an edit whose text is no
longer found fails, so a tree never silently equals main). Two kinds:
- candidates, same results as main, faster or not: SEGMENT 16 or 64 (checkpoint memory against scratch size)
  and the backward's CHUNK 4;
- ablations, wrong gradients, timed only to price one stage by the difference: no dB partial stores, no
  scratch (pass 2 starts every chunk from the segment's checkpoint), no pass 1 at all.
The loads issued a chunk ahead for B, C and the entering state (variants ahead_bc, ahead_h0, ahead_both of
this script at 9a0e880) are in main since.
"""
import argparse
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CHUNKS = "star/ops/triton/selective_scan_chunks.py"
SCAN = "star/ops/triton/selective_scan.py"
I12 = " " * 12  # the bodies of the backward's chunk loops

STORE_DB = (f"{I12}_store_channel_sum(dB_part_ptr, g * (delta * u)[:, None, :], t, part_bc_base, mask_t, N, N_PAD, "
            f"CHUNK,\n{I12}                   BLOCK_D, PRECISION)\n")
H0 = f"{I12}h0 = h0_next\n"
CKPT_STATE = "tl.load(ckpt_base + seg * N * D, mask=mask_nd, other=0.0)"


# name -> [(file, old text, new text)]
EDITS = {
    "seg16": [(CHUNKS, "CUDA_CONFIG = dict(SEGMENT=32,", "CUDA_CONFIG = dict(SEGMENT=16,")],
    "seg64": [(CHUNKS, "CUDA_CONFIG = dict(SEGMENT=32,", "CUDA_CONFIG = dict(SEGMENT=64,")],
    "bwd_c4": [(CHUNKS, "bwd=dict(BLOCK_D=32, CHUNK=2, num_warps=1),\n                   RESIDENT_PER_SM=8",
                "bwd=dict(BLOCK_D=32, CHUNK=4, num_warps=1),\n                   RESIDENT_PER_SM=8")],
    "ablate_db": [(SCAN, STORE_DB, "")],
    "ablate_scratch": [(SCAN, f"{I12}tl.store(scratch_base + k * N_PAD * BLOCK_D, h)\n", ""),
                       (SCAN, H0, f"{I12}h0 = {CKPT_STATE}\n")],
    "ablate_pass1": [(SCAN, "        for k in range(seg_chunks):\n", "        for k in range(0):\n"),
                     (SCAN, H0, f"{I12}h0 = {CKPT_STATE}\n")],
}


def make_tree(name: str, dest: Path) -> Path:
    """dest/name/src: a copy of src with the edits of `name` applied in order, each replacing exactly one
    occurrence."""
    tree = dest / name
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for file, old, new in EDITS[name]:
        path = tree / "src" / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"scan_trees.py: {name}: the text to replace occurs {text.count(old)} times in {file}, "
                             f"not once (the source moved on): {old.strip()[:80]!r}")
        path.write_text(text.replace(old, new))
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder the trees are made in (one subfolder per variant)")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"variants to make (default: all): {', '.join(EDITS)}")
    args = parser.parse_args()
    if unknown := [name for name in args.names if name not in EDITS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(EDITS)}")
    for name in args.names or EDITS:
        print(f"{name}={make_tree(name, args.dest)}")


if __name__ == "__main__":
    main()
