"""Source trees of the Triton scan backward with one named change each, for scan_variants.py to time side by side.

    python benchmarks/scan_trees.py DEST [NAME ...]      # default: every variant
    python benchmarks/scan_variants.py --trees main=. seg16=DEST/seg16 ...

Each tree is a copy of this tree's `src` with one edit, made by exact text replacement (an edit whose text is no
longer found fails, so a tree never silently equals main). Two kinds:
- candidates, same results as main, faster or not: SEGMENT 16 or 64 (checkpoint memory against scratch size),
  the backward's CHUNK 4, pass 1 rebuilding only the entering states (from u, delta and B, step by step
  from rows, which Triton 3.6 compiles) with dC taken in pass 2 instead, and the backward capped at 200, 168 or
  128 registers (ptxas's maxnreg: 10, 12 or 16 warps per SM instead of 8, for spills; the kernel is
  latency-bound with 8);
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
DD = f"{I12}dD_acc += tl.sum(dy * u, axis=0)\n"
STORE_DC = (f"{I12}_store_channel_sum(dC_part_ptr, hs * dy[:, None, :], t, part_bc_base, mask_t, N, N_PAD, CHUNK, "
            f"BLOCK_D,\n{I12}                   PRECISION)\n")
PASS1 = ("        h = tl.load(ckpt_base + seg * N * D, mask=mask_nd, other=0.0)\n", STORE_DC)  # first, last line
# new names, not pass 2's: Triton refuses a loop-carried name whose type changes (see dfd9323)
PASS1_STATES = PASS1[0] + """\
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, False, rows, ORDER)
        B_next, C_next = _chunk_bc(B_ptr, C_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        for k in range(seg_chunks):
            tl.store(scratch_base + k * N_PAD * BLOCK_D, h)
            u1, delta1, B1 = u_next, delta_next, B_next
            u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first + k + 1, pid_b, L, offs_d,
                                                      mask_d, stride_ub, stride_ul, stride_deltab, stride_deltal,
                                                      stride_zb, stride_zl, CHUNK, REVERSE, False, rows, ORDER)
            B_next, C_next = _chunk_bc(B_ptr, C_ptr, first + k + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE,
                                       rows, ORDER)
            t1, mask_t1, mask1, offs1 = _chunk_index(first + k, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows,
                                                     ORDER)
            delta1, dsp1 = _delta_values(delta1, mask1, bias, HAS_BIAS, SOFTPLUS)
            h = _chunk_end_state(h, delta1, u1.to(tl.float32), B1.to(tl.float32), A2, CHUNK)
"""
END_STATE = """@triton.jit
def _chunk_end_state(h, delta, u, Bt, A2, CHUNK: tl.constexpr):
    '''The state leaving one chunk entered with state h, step by step from its (CHUNK, BLOCK_D) rows of delta
    and u and (CHUNK, N_PAD) rows of B, without (CHUNK, N, BLOCK_D) tiles.'''
    rows = tl.arange(0, CHUNK)[:, None]
    du = delta * u
    for i in tl.static_range(CHUNK):
        d_i = tl.sum(tl.where(rows == i, delta, -0.0), axis=0)
        du_i = tl.sum(tl.where(rows == i, du, -0.0), axis=0)
        b_i = tl.sum(tl.where(rows == i, Bt, -0.0), axis=0)
        h = tl.exp2(d_i[None, :] * A2) * h + du_i[None, :] * b_i[:, None]
    return h


"""
STORE_SUM = "@triton.jit\ndef _store_channel_sum("
BWD_TILES = "bwd=dict(BLOCK_D=32, CHUNK=2, num_warps=1),\n                   RESIDENT_PER_SM=8"  # CUDA_CONFIG's
IMPORTS = "from star.ops.triton.selective_scan_chunks import (CUDA_CONFIG, LOG2E, _channel_block, _chunk_bc, "


# name -> [(file, old text, new text)]; old text (first, last) is the span from first through last
EDITS = {
    "seg16": [(CHUNKS, "CUDA_CONFIG = dict(SEGMENT=32,", "CUDA_CONFIG = dict(SEGMENT=16,")],
    "seg64": [(CHUNKS, "CUDA_CONFIG = dict(SEGMENT=32,", "CUDA_CONFIG = dict(SEGMENT=64,")],
    "bwd_c4": [(CHUNKS, BWD_TILES, BWD_TILES.replace("CHUNK=2", "CHUNK=4"))],
    # 16 channels a program: a warp's other 16 lanes split the state, so a thread holds half the states
    "bwd_d16": [(CHUNKS, BWD_TILES, BWD_TILES.replace("BLOCK_D=32", "BLOCK_D=16"))],
    "bwd_d16_c4": [(CHUNKS, BWD_TILES, BWD_TILES.replace("BLOCK_D=32", "BLOCK_D=16").replace("CHUNK=2", "CHUNK=4"))],
    "states_pass1": [(SCAN, PASS1, PASS1_STATES), (SCAN, DD, STORE_DC + DD),
                     (SCAN, IMPORTS, IMPORTS + "_chunk_end_state, _delta_values, "),
                     (CHUNKS, STORE_SUM, END_STATE + STORE_SUM)],
    **{f"bwd_maxnreg{cap}": [(CHUNKS, BWD_TILES, BWD_TILES.replace("num_warps=1)", f"num_warps=1, maxnreg={cap})"))]
       for cap in (200, 168, 128)},
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
        first, last = old if isinstance(old, tuple) else (old, None)
        start = text.find(first)
        end = start + len(first)
        if last is not None:  # the span runs to the one occurrence of `last` after `first`
            found = text.find(last, end)
            if found >= 0 and text.find(last, found + len(last)) < 0:
                end = found + len(last)
            else:
                first = last  # named in the error below
                start = -1
        if start < 0 or text.count(first) != 1:
            raise SystemExit(f"scan_trees.py: {name}: the text to replace is not found once in {file} (the source "
                             f"moved on): {first.strip()[:80]!r}")
        path.write_text(text[:start] + new + text[end:])
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
