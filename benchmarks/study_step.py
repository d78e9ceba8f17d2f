"""Where the time of one Fashion-MNIST-study fine-tuning step goes: GPU work or fixed per-step cost.

    python -m benchmarks.study_step [--batches 128 1024] [--modes eager compile reduce-overhead] [--out docs/benchmarks]

The study's records show ~100 ms of every fine-tuning step that does not grow with the batch (see
docs/benchmarks/README.md). This runs the study's full fine-tune step as star's engine does (the fmnist-tiny
classifier at 32 px, its loss, AdamW over its layer-decay groups, the cosine schedule, one loss.item() per
step) on random images already on the device, no data loader, and reports per batch size and mode:
  - ms per step (wall, synchronized) and images/s;
  - device ms per step: the summed time of the kernels the step ran (torch.profiler), so wall - device is
    time the GPU sat idle waiting for the host or for small kernels' launch latency.
Modes: eager; "compile" (torch.compile, default mode); "reduce-overhead" (torch.compile capturing CUDA graphs,
which removes per-kernel launch cost). Writes study_step.json (with the top ops of each run) and study_step.md.
"""
import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from star.config import apply_overrides
from star.build import build_model
from star.training import create_loss_fn, create_optimizer
from star.training.provenance import device_name, git_commit
from star.training.schedule import CosineSchedule, resolve_lr
from benchmarks.outputs import write_outputs
from experiments.fashion_mnist.recipes import RECIPES
from experiments.fashion_mnist.study import eval_config  # the study's own fine-tuning config

MODES = ("eager", "compile", "reduce-overhead")


def study_config(batch: int, device: str):
    cfg = eval_config(RECIPES["h100"], "ft100", 0, Path("/tmp/study_step"), None)
    return apply_overrides(cfg, ["--optim.batch_size", str(batch), "--device", device])


def make_step(cfg, mode: str, device: torch.device):
    """One engine-like optimizer step on a fixed random batch."""
    model = build_model(cfg).to(device).train()
    run = model if mode == "eager" else torch.compile(model, mode=None if mode == "compile" else mode)
    loss_fn = create_loss_fn(cfg, model.num_classes)
    lr = resolve_lr(cfg.optim)
    optimizer = create_optimizer(model, cfg.optim, lr)
    schedule = CosineSchedule(optimizer, lr, cfg.optim.min_lr, 10, 10 ** 6)
    images = torch.randn(cfg.optim.batch_size, model.in_chans, model.img_size, model.img_size, device=device)
    labels = torch.randint(0, model.num_classes, (cfg.optim.batch_size,), device=device)
    amp = device.type == "cuda"
    count = [0]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = loss_fn(run, (images, labels))
        loss.backward()
        loss.item()  # the engine's one host sync per step
        schedule.step(count[0])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count[0] += 1
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    # kernels only: a CPU op's self_device_time_total repeats the time of the kernels it launched
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"ms": statistics.median_high(times), "device_ms": device_us / 1e3 / steps,
            "top_ops_by_host_time": [{"op": e.key, "calls_per_step": e.count / steps,
                                      "host_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in top]}


def markdown(meta, rows) -> str:
    lines = [f"# One Fashion-MNIST-study fine-tuning step ({meta['device']}, {meta['date']})", "",
             f"`python -m benchmarks.study_step`, commit {meta['commit']}, torch {meta['torch']}. The study's full "
             "fine-tune step (fmnist-tiny classifier, 32 px, bf16 autocast, AdamW with layer decay, one "
             "loss.item() per step) on random images on the device; median of "
             f"{meta['steps']} steps after {meta['warmup']} warm-up steps. Device ms: summed kernel time per "
             "step (torch.profiler); the rest of the wall time the GPU waited.", "",
             "| batch | mode | ms / step | images / s | device ms / step | GPU idle |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['mode']} | failed: {r['error']} | | | |")
            continue
        idle = f"{1 - r['device_ms'] / r['ms']:.0%}" if r["device_ms"] else "-"  # no device profile on a CPU
        lines.append(f"| {r['batch']} | {r['mode']} | {r['ms']:.1f} | {r['batch'] / r['ms'] * 1e3:.0f} | "
                     f"{r['device_ms']:.1f} | {idle} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/study_step.py needs a CUDA GPU (--device cpu for a dry run)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            row = {"batch": batch, "mode": mode}
            try:
                row.update(measure(make_step(study_config(batch, args.device), mode, device), device, args.warmup,
                                   args.steps))
            except Exception as err:  # e.g. a compile failure: record it, time the rest
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps({k: v for k, v in row.items() if k != "top_ops_by_host_time"}), flush=True)
            rows.append(row)
    meta = dict(device=device_name(device), date=datetime.date.today().isoformat(), torch=torch.__version__,
                commit=git_commit(), warmup=args.warmup, steps=args.steps)
    write_outputs(args.out, "study_step", dict(meta=meta, rows=rows), markdown(meta, rows))


if __name__ == "__main__":
    main()
