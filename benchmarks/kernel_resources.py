"""Compile the Triton selective-scan and conv1d kernels for a GPU architecture without a GPU, and report what ptxas made
of them: registers per thread, spills (stack/local bytes), SASS instruction count, exp2 and global memory
instructions. A check for kernel edits on a machine with no GPU (it says nothing about time).

    python benchmarks/kernel_resources.py [--arch 90] [--sass-dir DIR] [--out docs/benchmarks/kernel_resources.jsonl]

The kernels are compiled with the CUDA tile configuration (`CUDA_CONFIG`), bf16 activations, d_state 16,
D, z, dt bias and softplus on, forward direction. --sass-dir writes each kernel's SASS (addresses stripped)
so that two versions can be diffed. --out appends the JSON lines (with the commit) to a file.
The conv kernels (k=4, bias, SiLU, with a scan order) are compiled with the divisibility by 16 that a launch
gives the mixer's arguments (pointers, channels, strides): without it every load is scalar and the report
overstates registers and spills.
"""
import argparse
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from star.ops.triton import causal_conv1d as conv
from star.ops.triton import selective_scan as kernels
from star.training.provenance import git_commit

BF16 = {"u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "y_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "B_ptr", "C_ptr"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile(kernel, constexprs: dict, pointer_type, num_warps: int, arch: int, divisible=(), maxnreg=None):
    """Compile `kernel` with these constexprs; pointer_type(name) gives each pointer's element type, and the
    arguments named in `divisible` are declared multiples of 16 (as a launch finds them); `maxnreg` caps the
    registers as the tile configuration's launch option does."""
    params = list(inspect.signature(kernel.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    signature = {p: "constexpr" if p in constexprs else pointer_type(p) if p.endswith("_ptr") else "i32"
                 for p in params}
    source = ASTSource(fn=kernel, signature=signature, attrs={(params.index(p),): [["tt.divisibility", 16]]
                                                              for p in params if p in divisible},
                       constexprs={(params.index(k),): v for k, v in constexprs.items()})
    options = dict(num_warps=num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_kernel(direction: str, arch: int):
    kernel = getattr(kernels, f"_scan_{direction}_kernel")
    tiles = kernels.CUDA_CONFIG[direction]
    constexprs = dict(N=16, N_PAD=16, BLOCK_D=tiles["BLOCK_D"], CHUNK=tiles["CHUNK"],
                      SEG_CHUNKS=kernels.CUDA_CONFIG["SEGMENT"] // tiles["CHUNK"], HAS_D=True, HAS_Z=True,
                      HAS_BIAS=True, SOFTPLUS=True, REVERSE=False, ORDER=False, HAS_INIT=False)
    constexprs.update(PRECISION="tf32") if direction == "bwd" else constexprs.update(SAVE_STATES=True)
    return _compile(kernel, constexprs, lambda p: "*bf16" if p in BF16 else "*i32" if p == "order_ptr" else "*fp32",
                    tiles["num_warps"], arch, maxnreg=tiles.get("maxnreg"))


def compile_conv(direction: str, arch: int):
    kernel = getattr(conv, f"_conv_{direction}_kernel")
    tiles = getattr(conv, f"{direction.upper()}_TILES", None)
    if tiles is None:  # trees before 9477a74: one setting for both kernels
        tiles = dict(BLOCK_L=conv.BLOCK_L, BLOCK_D=conv.BLOCK_D, num_warps=conv.NUM_WARPS)
    constexprs = dict(K=4, STEP=-1, HAS_BIAS=True, SILU=True, ORDER=True, SEGMENT_TILES=conv.SEGMENT_TILES, K_PAD=4,
                      **{k: v for k, v in tiles.items() if k != "num_warps"})
    pointers = [p for p in inspect.signature(kernel.fn).parameters if p.endswith("_ptr")]
    return _compile(kernel, constexprs,
                    lambda p: "*i32" if p == "order_ptr" else "*fp32" if p in ("w_ptr", "bias_ptr") or "part" in p
                    else "*bf16", tiles["num_warps"], arch, divisible=(*pointers, "D", "stride_xb", "stride_xl"))


def report(compiled) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    instructions = [re.sub(r"/\*[0-9a-f]{4}\*/", "", line).split(";")[0].strip()
                    for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]
    resources = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    ptx = compiled.asm["ptx"]
    return dict(**resources, sass_instructions=len(instructions), ex2=len(re.findall(r"ex2\.approx", ptx)),
                ld_global=len(re.findall(r"ld\.global", ptx)), st_global=len(re.findall(r"st\.global", ptx))), \
        "\n".join(instructions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100)")
    parser.add_argument("--sass-dir", type=Path, help="write <dir>/{scan,conv}_{fwd,bwd}.sass")
    parser.add_argument("--out", type=Path, help="append the results here as JSON lines")
    args = parser.parse_args()
    commit = git_commit()  # before the first line is appended: --out may be a tracked file
    for op, direction in (("scan", "fwd"), ("scan", "bwd"), ("conv", "fwd"), ("conv", "bwd")):
        compile_fn = compile_kernel if op == "scan" else compile_conv
        numbers, sass = report(compile_fn(direction, args.arch))
        line = json.dumps(dict(kernel=f"{op}_{direction}", arch=f"sm_{args.arch}", commit=commit,
                               triton=triton.__version__, **numbers))
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        if args.sass_dir:
            args.sass_dir.mkdir(parents=True, exist_ok=True)
            (args.sass_dir / f"{op}_{direction}.sass").write_text(sass + "\n")


if __name__ == "__main__":
    main()
