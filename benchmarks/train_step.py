"""Pretraining throughput of STAR (linear-time Mamba) vs a ViT of the same width and depth (quadratic attention).

    python benchmarks/train_step.py [--out docs/benchmarks] [--sizes tiny small base] [--num-images 1 4 16 64 128]
    python benchmarks/train_step.py --task finetune [--compile]   # the 4-direction classifier at 224 px
    python benchmarks/train_step.py --sizes base --impls triton --profile --out docs/benchmarks/k_sweep/base

One training step = bf16-autocast forward, backward, AdamW step, on random images already on the GPU (no
data loading). STAR models are `star_pretrain_{size}_patch16_192` with K images per sequence (K * 160 encoder tokens:
144 patches + a 16-token separator per image) for each scan implementation; "chunked" (plain PyTorch) runs
only where --chunked-sizes/--chunked-max-images allow, since it launches kernels per time step. The ViT is
timm's VisionTransformer (PyTorch SDPA attention, no class token, average pooling, 1000-way head) at
img_size = 192 * sqrt(K), i.e. the same K * 144 patch tokens per sequence. Every configuration runs
--images images per step (batch = images // K sequences). Writes train_step.json and train_step.md.

--task finetune times the classification step instead: `star_{size}_patch16_224` (4 scan directions run as
one batch, 197 tokens) against the same ViT at 224 px, cross-entropy on random labels, K = 1; it writes
train_step_finetune.{json,md}. --compile wraps every model (STAR and ViT) in torch.compile (--compile-mode, default
"default"; "reduce-overhead" replays CUDA graphs), adds "+compile" (and the mode) to the implementation names
and "_compile" (and the mode) to the file names; compile time is spent in
the warm-up steps, not timed. A configuration that fails is recorded as an error row.

--profile (eager only) adds one more step per configuration under torch.profiler and splits its CUDA kernel
time by part of the model (benchmarks/breakdown.py): scan kernels, the rest of the mixers, MLPs, norms,
decoder, optimizer, ... for STAR; attention, MLPs, norms, ... for the ViT. The pretraining run also draws
images/s against K for every model into train_step.png. --recompute none mixer block times STAR at each
`--model.recompute` setting ("+recompute <setting>" in the implementation's name).
--profile also splits the step by kind of kernel, lists its largest kernels and counts the activations a
forward keeps for backward, by part, and splits the step's host time by part with the host's largest ops and the
number of kernels launched. --render JSON rebuilds the Markdown table of an earlier run's JSON.
"""
import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from timm.models.vision_transformer import VisionTransformer

import star
from star.model_names import SIZES
from star.models.mamba import RECOMPUTE
from star.training.provenance import git_commit
from breakdown import KERNEL_RULES, saved_by_part, star_parts, step_breakdown, vit_parts
from outputs import write_outputs

BENCH_SIZES = ("tiny", "small", "base")


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")  # torch.cuda.memory_stats keys


def time_steps(step, warmup: int, steps: int) -> tuple:
    """Median ms per step (CUDA events around each step), peak GiB allocated and reserved (the caching allocator's
    pools: CUDA graphs keep their memory in a pool of their own, and their replays allocate nothing, so only
    reserved counts it), the median host ms: how long the step's Python takes to return, each step started on an
    idle GPU, and the caching allocator's cudaMalloc and cudaFree calls and retries per timed step. A host ms
    close to the step's ms means the GPU waits for the host (or the launch queue is full, or the step waits on
    the GPU: a cudaFree synchronizes the device)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        step()
        host.append((time.perf_counter() - began) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    after = torch.cuda.memory_stats()
    allocator = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in ALLOCATOR_COUNTS}
    return (statistics.median_high(times), torch.cuda.max_memory_allocated() / 2**30,
            torch.cuda.max_memory_reserved() / 2**30, statistics.median_high(host), allocator)


def training_step(model, loss_fn):
    """One optimizer step over `model`'s parameters of the loss `loss_fn()` computes; its parts stay reachable
    as `step.forward_backward` and `step.optimizer` for the profiled breakdown."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    def forward_backward():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (compile's reduce-overhead mode)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.forward_backward, step.optimizer = forward_backward, optimizer
    return step


def measure(model, loss_fn, warmup, steps, parts, profile: bool) -> dict:
    """ms per step and peak GiB; with `profile`, also ms per part and per kind of kernel of one more step, its
    largest kernels, and the MiB of activations a forward keeps for backward, per part."""
    step = training_step(model, loss_fn)
    ms, mem, reserved, host_ms, allocator = time_steps(step, warmup, steps)
    row = dict(ms=ms, peak_gib=mem, reserved_gib=reserved, host_ms=host_ms, allocator_per_step=allocator)
    if profile:
        kernels = {}
        row["breakdown_ms"] = step_breakdown(model, step.forward_backward, step.optimizer, parts, KERNEL_RULES,
                                             kernels=kernels)
        row["kernel_kinds_ms"], row["top_kernels_ms"] = kernels["kinds"], kernels["top"]
        row["host_parts_ms"], row["top_host_ms"] = kernels["host"], kernels["top_host"]
        row["kernel_launches"] = kernels["launches"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            row["saved_mib"] = saved_by_part(model, loss_fn, parts)
    return row


def training_model(model, compile_model: Optional[str]):
    """(module whose parameters the optimizer owns, callable the loss runs through); `compile_model` is None
    (eager) or a torch.compile mode."""
    if compile_model is None:
        return model, model
    return model, torch.compile(model, mode=None if compile_model == "default" else compile_model)


def impl_label(impl: str, compile_model: Optional[str] = None, recompute: str = "none") -> str:
    """The implementation column: the scan or attention, "+compile" (with its mode unless default),
    "+recompute <setting>"."""
    compiled = "" if compile_model is None else "+compile" + ("" if compile_model == "default" else f" {compile_model}")
    return impl + compiled + (f"+recompute {recompute}" if recompute != "none" else "")


def bench_star(size, k, impl, images_per_step, warmup, steps, task="pretrain", compile_model=None, profile=False,
               recompute="none"):
    if task == "finetune":
        model = star.create_model(f"star_{size}_patch16_224", scan_impl=impl, recompute=recompute).cuda()
        model, run = training_model(model, compile_model)
        images = torch.randn(images_per_step, 3, 224, 224, device="cuda")
        labels = torch.randint(0, 1000, (images_per_step,), device="cuda")
        loss_fn, tokens = (lambda: F.cross_entropy(run(images), labels)), 197
    else:
        model = star.create_model(f"star_pretrain_{size}_patch16_192", num_images=k, scan_impl=impl,
                                  recompute=recompute).cuda()
        model, run = training_model(model, compile_model)
        images = torch.randn(images_per_step // k, k, 3, 192, 192, device="cuda")
        loss_fn, tokens = (lambda: run(images)["loss"]), k * 160
    return dict(model=f"star_{size}", impl=impl_label(impl, compile_model, recompute), tokens_per_seq=tokens,
                **measure(model, loss_fn, warmup, steps, star_parts(), profile))


def bench_vit(size, k, images_per_step, warmup, steps, task="pretrain", compile_model=None, profile=False):
    dim, depth = SIZES[size]["embed_dim"], SIZES[size]["depth"]
    img_size = 224 if task == "finetune" else round(192 * math.sqrt(k))
    model, run = training_model(VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=dim, depth=depth, num_heads=dim // 64, class_token=False,
        global_pool="avg", num_classes=1000).cuda(), compile_model)
    batch = images_per_step // k
    images = torch.randn(batch, 3, img_size, img_size, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    return dict(model=f"vit_{size}", impl=impl_label("sdpa", compile_model),
                tokens_per_seq=(img_size // 16) ** 2,
                **measure(model, lambda: F.cross_entropy(run(images), labels), warmup, steps, vit_parts(), profile))


def run(args):
    rows = []
    compile_model = args.compile_mode if args.compile else None
    extra = dict(task=args.task, compile_model=compile_model, profile=args.profile)
    for size in args.sizes:
        for k in args.num_images if args.task == "pretrain" else [1]:
            runs = [] if args.no_vit else [(f"vit_{size}", impl_label("sdpa", compile_model),
                                            lambda: bench_vit(size, k, args.images, args.warmup, args.steps, **extra))]
            for impl in args.impls:
                if impl == "chunked" and (size not in args.chunked_sizes or k > args.chunked_max_images):
                    continue
                for mode in args.recompute:
                    runs.append((f"star_{size}", impl_label(impl, compile_model, mode),
                                 lambda impl=impl, mode=mode: bench_star(size, k, impl, args.images, args.warmup,
                                                                         args.steps, **extra, recompute=mode)))
            for model, impl, bench in runs:
                try:
                    row = bench()
                except torch.OutOfMemoryError:
                    row = dict(model=model, impl=impl, ms=None, error="OOM")
                except Exception as err:  # e.g. a --compile failure: record it, keep the other rows
                    row = dict(model=model, impl=impl, ms=None, error=f"{type(err).__name__}: {str(err)[:160]}")
                torch.cuda.empty_cache()
                row.update(size=size, num_images=k, batch=args.images // k)
                if row["ms"]:
                    row["images_per_s"] = row["batch"] * k / (row["ms"] * 1e-3)
                    row["tokens_per_s"] = row["batch"] * row["tokens_per_seq"] / (row["ms"] * 1e-3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(meta, rows):
    finetune = meta.get("task") == "finetune"
    if finetune:
        head = [f"# Fine-tuning step throughput ({meta['device']}, {meta['date']})", "",
                f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. One step = bf16 autocast "
                f"forward + backward + fused AdamW on {meta['images']} random 224 px images, cross-entropy; median "
                f"of {meta['steps']} steps after {meta['warmup']} warm-up steps. STAR: the 4-direction classifier "
                f"(197 tokens); ViT: same width/depth, 196 patch tokens, SDPA attention."]
    else:
        head = [f"# Pretraining step throughput ({meta['device']}, {meta['date']})", "",
                f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. One step = bf16 autocast "
                f"forward + backward + fused AdamW on {meta['images']} random 192 px images (batch = images / K "
                f"sequences); median of {meta['steps']} steps after {meta['warmup']} warm-up steps. STAR: K * 160 "
                f"encoder tokens per sequence (+ the 4-block decoder); ViT: same width/depth, img_size 192 * sqrt(K) "
                f"= K * 144 patch tokens, SDPA attention."]
    if meta.get("compile"):
        head[-1] += f" Every model compiled with torch.compile (mode {meta.get('compile_mode') or 'default'})."
    columns = ["size"] + ([] if finetune else ["K"]) + ["model", "scan / attention", "batch", "ms / step",
                                                         "host ms", "images / s", "tokens / s", "peak GiB",
                                                         "reserved GiB", "cudaMalloc / cudaFree per step"]
    lines = head + ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["size"]] + ([] if finetune else [r["num_images"]]) + [r["model"], r["impl"], r["batch"]]
        if r.get("ms"):
            host = f"{r['host_ms']:.1f}" if "host_ms" in r else "-"  # rows timed before it was recorded
            counts = r.get("allocator_per_step")
            cells += [f"{r['ms']:.1f}", host, f"{r['images_per_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['peak_gib']:.1f}", f"{r['reserved_gib']:.1f}" if "reserved_gib" in r else "-",
                      "-" if counts is None else
                      f"{counts['num_device_alloc']:g} / {counts['num_device_free']:g}"]
        else:
            cells += [r.get("error", "failed"), "", "", "", "", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    profiled = [r for r in rows if r.get("breakdown_ms")]
    if profiled:
        lines += ["", "CUDA kernel time of one profiled step by part of the model, ms (benchmarks/breakdown.py; "
                  "backward kernels count with the forward op that made them):", ""]
        lines += _part_table(profiled, "breakdown_ms", finetune)
        for key, what in (("kernel_kinds_ms", "CUDA kernel time of the same step by kind of kernel, ms "
                                              "(breakdown.KERNEL_KINDS, by kernel name):"),
                          ("saved_mib", "Activations one forward keeps for backward, MiB, by part (each storage "
                                        "once, parameters left out; breakdown.saved_by_part):"),
                          ("host_parts_ms", "Host (CPU) time of the same step by part, ms: each op's own time and "
                                            "the Python between the ops of a part (breakdown.host_time), backward "
                                            "counted with the forward op; under the profiler, so above the host ms "
                                            "of the plain steps:")):
            lines += ["", what, ""] + _part_table([r for r in profiled if key in r], key, finetune)
        for r in profiled:
            lines += ["", f"Largest kernels of {r['model']} ({r['impl']}"
                      + ("" if finetune else f", K={r['num_images']}") + "), ms:", ""]
            lines += [f"- {ms:.1f} `{name}`" for name, ms in r.get("top_kernels_ms", {}).items()]
            if "top_host_ms" in r:
                lines += ["", f"Largest host ops of the same step, ms of their own CPU time "
                          f"({r['kernel_launches']} CUDA kernels launched):", ""]
                lines += [f"- {ms:.1f} `{name}`" for name, ms in r["top_host_ms"].items()]
    return "\n".join(lines) + "\n"


def _part_table(rows, key, finetune) -> list:
    """A Markdown table of rows[i][key] (a name -> value dict with "total"), one row per configuration."""
    names = list(dict.fromkeys(p for r in rows for p in r[key] if p != "total")) + ["total"]
    columns = ["size"] + ([] if finetune else ["K"]) + ["model", "implementation"] + names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["size"]] + ([] if finetune else [r["num_images"]]) + [r["model"], r["impl"]]
        cells += [f"{r[key][p]:.1f}" if p in r[key] else "" for p in names]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def plot_images_per_s(rows, path: Path) -> None:
    """images/s against K (log scale), one line per model and implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, impl in dict.fromkeys((r["model"], r["impl"]) for r in rows):
        points = sorted((r["num_images"], r["images_per_s"]) for r in rows
                        if (r["model"], r["impl"]) == (model, impl) and r.get("ms"))
        if points:
            ax.plot(*zip(*points), marker="o", linestyle="--" if model.startswith("vit") else "-",
                    label=model if impl in ("triton", "sdpa") else f"{model} ({impl})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K, images per sequence (STAR: K * 160 tokens; ViT: K * 144)")
    ax.set_ylabel("images / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--sizes", nargs="+", default=list(BENCH_SIZES), choices=list(SIZES))
    parser.add_argument("--num-images", type=int, nargs="+", default=[1, 4, 16, 64, 128],
                        help="K, images per sequence")
    parser.add_argument("--impls", nargs="+", default=["triton", "chunked"], choices=["triton", "chunked", "ref"])
    parser.add_argument("--chunked-sizes", nargs="+", default=["tiny"], help="sizes the chunked scan runs at")
    parser.add_argument("--chunked-max-images", type=int, default=4, help="largest K the chunked scan runs at")
    parser.add_argument("--images", type=int, default=256, help="images per step (a multiple of every K)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs)")
    parser.add_argument("--profile", action="store_true", help="add each step's time by part of the model")
    parser.add_argument("--no-vit", action="store_true",
                        help="time STAR only (the ViT rows of another run in the same process or call serve)")
    parser.add_argument("--recompute", nargs="+", default=["none"], choices=RECOMPUTE,
                        help="STAR's --model.recompute settings to time (each a row)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rebuild the Markdown table beside a train_step JSON (a run that came back without it)")
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(data["meta"], data["rows"]))
        return
    if args.profile and args.compile:
        raise SystemExit("--profile times eager steps; run it without --compile")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA GPU")
    bad = [k for k in args.num_images if k < 1 or args.images % k] if args.task == "pretrain" else []
    if bad:
        raise SystemExit(f"--images {args.images} must be a positive multiple of every K; not of {bad}")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = run(args)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, commit=git_commit(), images=args.images, steps=args.steps,
                warmup=args.warmup, task=args.task, compile=args.compile,
                compile_mode=args.compile_mode if args.compile else None)
    name = "train_step" + ("_finetune" if args.task == "finetune" else "") + ("_compile" if args.compile else "") \
        + ("_" + args.compile_mode.replace("-", "_") if args.compile and args.compile_mode != "default" else "")
    write_outputs(args.out, name, dict(meta=meta, rows=rows), markdown(meta, rows))
    if args.task == "pretrain" and len(args.num_images) > 1:
        plot_images_per_s(rows, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
