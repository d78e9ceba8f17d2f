"""Does packing K images per sequence (STAR) beat one image per sequence (ARM) on Fashion-MNIST?

The whole study, on one GPU (or one shard per GPU of a machine, below), in resumable stages:

    python -m experiments.fashion_mnist.study run --stage 1            # seed 0 of scratch, ARM, STAR
    python -m experiments.fashion_mnist.study run --next --budget-min 9  # whatever is left, until 9 min are used
    python -m experiments.fashion_mnist.study run --stage 2 --items linprobe ft1  # only these evaluations
    python -m experiments.fashion_mnist.study status                   # done / to do
    python -m experiments.fashion_mnist.study bench-loader             # data-loader images/s alone
    python -m experiments.fashion_mnist.study bench-train --settings star_k4:2048:reduce-overhead  # trainer img/s
    python -m experiments.fashion_mnist.study merge --returned fm0.tgz fm1.tgz  # bring a GPU call's results home

(from the repo root, with star importable: installed, or PYTHONPATH=src).

On a machine with N GPUs, N shards run at once, one per GPU, each with its own --out and --runs (a shard takes
every N-th unfinished unit, so they never share one); gpu_call.sh starts them and packs one archive each:

    OUT=<folder> bash experiments/fashion_mnist/gpu_call.sh <commit>  # one call: 9.4 minutes of units

A unit of work is one arm x seed: pretraining (unless the arm is "scratch"), then four evaluations of the
encoder, each a fresh classifier trained on the 55k-image training part and measured on the untouched test
split: a linear probe, fine-tuning with 1% and 10% of the labels, and full fine-tuning. Every finished item
is written at once to results.json (atomically), under a key that names the recipe, so a rerun skips it and
results of another recipe are never mixed in. Pretrained weights live only in the runs folder, so a unit
is planned to finish inside one call; a unit cut off re-pretrains when it resumes. Weights, loss curves and
prediction pictures sit in a folder named by the recipe id (runs/<id>/, curves/<id>/, figures/<id>/), so a
smoke run never stands in for the study's. The arms, stages and recipes are in recipes.py.

Everything goes through the library (`star.cli.train.run`, `star.cli.inference.evaluate_run`); the only
glue is the random-init encoder that gives the scratch arm's linear probe (a floor: what random features
are worth).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from star.cli.inference import draw_predictions, evaluate_run
from star.build import build_loaders, build_model
from star.cli.train import run
from star.config import TrainConfig, apply_overrides, load_config
from star.models import create_model
from star.training.checkpoint import atomic_write
from star.training.provenance import environment

from .recipes import ARMS, EVALS, PRESET, RECIPES, STAGES, recipe_id

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- results.json


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_results(path: Path, results: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n"))


def save_result(path: Path, key: str, entry: dict) -> None:
    """Add one entry and rewrite the file atomically (a call cut off never leaves half a file)."""
    results = load_results(path)
    results[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_results(path, results)


def item_key(recipe: str, arm: str, seed: int, item: str) -> str:
    return f"{recipe}/{arm}/s{seed}/{item}"


# ---------------------------------------------------------------------------- configs


def _flags(values: dict, section: str = "") -> list[str]:
    """Command-line overrides of `values`, in a config section ("model", "optim") or at the top level."""
    prefix = f"--{section}." if section else "--"
    return [a for k, v in values.items() for a in (prefix + k, str(v))]


def _common(recipe: dict, seed: int, output_dir: Path) -> list[str]:
    # one checkpoint, at the end: a run cut off mid-way starts over (`_fresh`), and the 1%-label fine-tune
    # would otherwise write 50 of them
    flags = ["--seed", str(seed), "--output_dir", str(output_dir), "--eval_every", "0", "--save_every", "-1",
             "--keep_last", "1", "--log_every", "10", "--data.dataset", recipe["dataset"], "--data.num_workers",
             str(recipe["num_workers"])]
    if recipe["max_steps"] is not None:
        flags += ["--max_steps", str(recipe["max_steps"])]
    return flags


def pretrain_config(recipe: dict, arm: str, seed: int, output_dir: Path, arms: dict = ARMS) -> TrainConfig:
    """An arm's pretraining run: the arm's model arguments (`arms`), the recipe's model and optim settings, and
    its `pretrain_run` settings of the run itself (compile, snapshot_every), if any."""
    flags = _common(recipe, seed, output_dir) + _flags(recipe["model"], "model")
    flags += _flags(recipe["pretrain"], "optim") + ["--data.num_samples", str(recipe["train_images"])]
    # the study ran before the per-image decoder window was the default: an arm that names none keeps "sequence"
    flags += _flags({"decoder_window": "sequence", **arms[arm]}, "model")
    flags += _flags(recipe.get("pretrain_run", {}))
    return apply_overrides(load_config(PRESET, "pretrain"), flags)


def eval_config(recipe: dict, item: str, seed: int, output_dir: Path, pretrained, extra_epochs: int = 0,
                flags_after=()) -> TrainConfig:
    """A classifier run. `pretrained` None trains from scratch; `extra_epochs` are the scratch arm's share of
    the pretraining compute; `flags_after`, command-line overrides, come last."""
    spec = dict(recipe["evals"][item])
    task, fraction = spec.pop("task"), spec.pop("label_fraction")
    spec["epochs"] += extra_epochs
    encoder = {k: v for k, v in recipe["model"].items() if not k.startswith("decoder")}
    flags = _common(recipe, seed, output_dir) + _flags(encoder, "model") + _flags(spec, "optim")
    flags += ["--data.label_fraction", str(fraction), "--data.val_size", str(recipe["val_size"]),
              "--pretrained", str(pretrained), "--data.num_samples", str(recipe["train_images"])]
    return apply_overrides(load_config(PRESET, task), flags + list(flags_after))


def random_encoder(recipe: dict, seed: int, folder: Path) -> Path:
    """A never-trained pretraining model saved like a pretrained one, for the scratch arm's linear probe."""
    cfg = pretrain_config(recipe, "star_k4", seed, folder)
    torch.manual_seed(seed)
    return create_model(cfg.model.name, **cfg.model.overrides()).save_pretrained(folder / "model")


# ---------------------------------------------------------------------------- work items


def _train_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _throughput(run_dir: Path) -> float:
    """Median training images/s over the logged steps (the first row, which holds the warm-up, left out)."""
    rates = [float(r["train/img_s"]) for r in _train_rows(run_dir) if r.get("train/img_s")]
    return statistics.median(rates[1:] or rates)


def _prune(run_dir: Path) -> None:
    """Checkpoints are only needed while a run trains: keep metrics.csv, config.yaml and the final model."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def _fresh(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off mid-way starts over
    return run_dir


def curve_file(rid: str, arm: str, seed: int) -> Path:
    """Where a pretraining's loss curve is kept, relative to the study folder."""
    return Path("curves", rid, f"{arm}_s{seed}.csv")


def picture_file(rid: str, arm: str) -> Path:
    """Where an arm's prediction picture (seed 0's encoder) is kept, relative to the study folder."""
    return Path("figures", rid, f"predictions_{arm}.png")


def do_pretrain(recipe: dict, arm: str, seed: int, runs: Path, out: Path, rid: str, arms: dict = ARMS) -> dict:
    """Pretrain under runs/; the loss curve goes to out/curves/<rid>/, seed 0's prediction picture to
    out/figures/<rid>/."""
    run_dir = _fresh(runs / arm / f"s{seed}" / "pretrain")
    cfg = pretrain_config(recipe, arm, seed, run_dir, arms)
    model = build_model(cfg)
    built = {k: model.init_args[k] for k in arms[arm]}
    if built != arms[arm]:
        raise RuntimeError(f"arm {arm} asks for {arms[arm]} but the config built {built}")
    loader, _ = build_loaders(cfg, model)
    steps = min(cfg.optim.epochs * len(loader), cfg.max_steps or 10 ** 12)
    del model, loader
    start = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - start
    _prune(run_dir)
    curve = out / curve_file(rid, arm, seed)
    curve.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "metrics.csv", curve)
    entry = {"wall_s": wall, "images_seen": steps * cfg.optim.batch_size, "img_s": _throughput(run_dir),
             "final_loss": float(_train_rows(run_dir)[-1]["train/loss"]), **arms[arm]}
    if seed == 0:  # one picture of what the model predicts, per arm
        draw_predictions(str(run_dir), str(out / picture_file(rid, arm)), num_sequences=3, device=cfg.device)
    return entry


def do_eval(recipe: dict, arm: str, seed: int, item: str, runs: Path) -> dict:
    unit = runs / arm / f"s{seed}"
    run_dir = _fresh(unit / item)
    if ARMS[arm] is not None:
        pretrained, extra = unit / "pretrain", 0
    elif item == "linprobe":
        pretrained, extra = random_encoder(recipe, seed, _fresh(unit / "random_init")).parent, 0
    else:
        pretrained, extra = None, recipe["pretrain"]["epochs"]
    return evaluate_encoder(recipe, item, seed, run_dir, pretrained, extra)


def evaluate_encoder(recipe: dict, item: str, seed: int, run_dir: Path, pretrained, extra_epochs: int = 0,
                     flags_after=(), test: bool = True) -> dict:
    """Train evaluation `item`'s classifier from `pretrained` (None: from scratch) in run_dir, then measure it
    once on the test split (unless `test` is False: a run that chooses settings sees only the holdout); the
    entry to record."""
    cfg = eval_config(recipe, item, seed, run_dir, pretrained, extra_epochs, flags_after)
    start = time.perf_counter()
    val = run(cfg)
    wall = time.perf_counter() - start
    entry = {"val_top1": val.get("val/top1"), "val_loss": val.get("val/loss"), "wall_s": wall,
             "img_s": _throughput(run_dir), "epochs": cfg.optim.epochs, "label_fraction": cfg.data.label_fraction}
    if test:
        eval_batch = min(1024, max(s["batch_size"] for s in recipe["evals"].values()))
        measured = evaluate_run(str(run_dir), ["--data.num_workers", str(recipe["num_workers"])], split="test",
                                device=cfg.device, batch_size=eval_batch)
        entry.update(test_top1=measured["top1"], test_loss=measured["loss"])
    _prune(run_dir)
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    return entry


def unit_items(arm: str) -> list[str]:
    return (["pretrain"] if ARMS[arm] is not None else []) + list(EVALS)


def unit_done(results: dict, rid: str, arm: str, seed: int) -> bool:
    """Whether every item of the arm x seed is recorded."""
    return all(item_key(rid, arm, seed, i) in results for i in unit_items(arm))


def estimate(results: dict, recipe_name: str, arm: str, item: str, device: str | None = None) -> float:
    """Seconds an item should take: the slowest of this recipe's own measured items of its kind per epoch
    (pretraining: of the same K; a K not measured yet is guessed at 1.5x the slowest measured K), times this
    item's epochs, plus start-up; the recipe's guess before anything was measured. With `device`, only that
    card's measurements count when it has any (an H100's would make H200 calls plan too little work).
    Carried-over entries are left out: older code measured them (slower, see carry_over)."""
    recipe, rid = RECIPES[recipe_name], recipe_id(recipe_name)
    kind = [e for k, e in results.items()
            if k.startswith(rid + "/") and e.get("item") == item and "carried_from" not in e]
    kind = [e for e in kind if e.get("device") == device] or kind
    if not kind:
        return recipe["estimate_s"][item]
    if item == "pretrain":
        same = [e["wall_s"] for e in kind if e.get("num_images") == ARMS[arm]["num_images"]]
        return (max(same) if same else 1.5 * max(e["wall_s"] for e in kind)) * 1.1 + 10
    extra = recipe["pretrain"]["epochs"] if ARMS[arm] is None and item != "linprobe" else 0
    return max(e["wall_s"] / e["epochs"] for e in kind) * (recipe["evals"][item]["epochs"] + extra) * 1.1 + 10


def run_units(units, recipe_name: str, out: Path, runs: Path, budget_s: float | None, items=None,
              shard: str | None = None) -> bool:
    """Run every unfinished item of `units` (only `items`, if given, plus the pretraining they need); True if
    all are done. With a budget, a unit (or an item of one) is started only when its estimated time still
    fits; a unit that does not fit is skipped for a later one that does (the scratch arm's items need no
    pretraining, so they fill the end of a call). `shard` ("I/N") is recorded in each entry: N runs shared
    the machine, one per GPU."""
    recipe, rid = RECIPES[recipe_name], recipe_id(recipe_name)
    results_path, runs = out / "results.json", runs / rid  # weights of another recipe are never reused
    start, env, finished = time.perf_counter(), environment(), True
    for arm, seed in units:
        results = load_results(results_path)
        todo = [i for i in unit_items(arm) if item_key(rid, arm, seed, i) not in results
                and (items is None or i in items)]
        if not todo:
            continue
        needs_pretrain = ARMS[arm] is not None and not (runs / arm / f"s{seed}" / "pretrain" / "model").is_dir()
        if needs_pretrain and "pretrain" not in todo:
            todo.insert(0, "pretrain")  # weights gone (another call): pretrain again, same seed
        for i, item in enumerate(todo):
            # a unit with pretraining must fit whole before it starts (its weights do not outlive the call)
            whole = i == 0 and ARMS[arm] is not None
            needed = sum(estimate(results, recipe_name, arm, t, env["device"]) for t in (todo if whole else [item]))
            left = None if budget_s is None else budget_s - (time.perf_counter() - start)
            if left is not None and needed > left:
                print(f"[study] skipping {arm} s{seed} {item}: needs ~{needed:.0f}s, {left:.0f}s left")
                finished = False
                break
            print(f"[study] {arm} seed {seed}: {item}", flush=True)
            if item == "pretrain":
                entry = do_pretrain(recipe, arm, seed, runs, out, rid)
            else:
                entry = do_eval(recipe, arm, seed, item, runs)
            entry.update(arm=arm, seed=seed, item=item, recipe=rid, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **env)
            if shard:
                entry["shard"] = shard
            save_result(results_path, item_key(rid, arm, seed, item), entry)
            results = load_results(results_path)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()
                     if k in ("test_top1", "val_top1", "wall_s", "img_s", "final_loss")}
            print(f"[study] done {arm} seed {seed} {item}: {shown}", flush=True)
        else:
            results = load_results(results_path)
            if unit_done(results, rid, arm, seed):
                shutil.rmtree(runs / arm / f"s{seed}", ignore_errors=True)  # the unit is finished: free the weights
    return finished


def bench_loader(recipe_name: str, out: Path, num_batches: int = 60) -> dict:
    """Images/s of the library's loaders alone (pretraining, K=4; fine-tuning with RandAugment), to tell
    whether training is bound by PIL augmentation on the CPU rather than by the GPU."""
    recipe, rates = RECIPES[recipe_name], {}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"pretrain_k4": pretrain_config(recipe, "star_k4", 0, Path(tmp)),
                   "finetune": eval_config(recipe, "ft100", 0, Path(tmp), None)}
        for name, cfg in configs.items():
            loader, _ = build_loaders(cfg, build_model(cfg))
            it = iter(loader)
            next(it)  # workers started
            count, start = 0, time.perf_counter()
            for _, batch in zip(range(num_batches), it):
                images = batch[0]
                count += images.shape[0] * (images.shape[1] if images.ndim == 5 else 1)
            rates[f"{name}_img_s"] = count / (time.perf_counter() - start)
    entry = {**rates, "num_workers": recipe["num_workers"], "item": "loader", "recipe": recipe_id(recipe_name),
             **environment()}
    save_result(out / "results.json", f"{recipe_id(recipe_name)}/loader/{entry['device']}", entry)
    print(f"[study] loader: {rates}")
    return entry


BENCH_MODES = ("eager", "compile", "reduce-overhead")


def parse_setting(text: str) -> str:
    """A bench-train setting "ITEM:BATCH:MODE", checked."""
    parts = text.split(":")
    items = [a for a in ARMS if ARMS[a] is not None] + list(EVALS)  # scratch has no pretraining to time
    if len(parts) != 3 or parts[0] not in items or not parts[1].isdigit() or parts[2] not in BENCH_MODES:
        raise argparse.ArgumentTypeError(
            f"--settings wants ITEM:BATCH:MODE with ITEM one of {', '.join(items)}, BATCH a number and "
            f"MODE one of {', '.join(BENCH_MODES)}; got {text!r}")
    return text


def _kernel_times(prof, steps: int) -> tuple[float, dict]:
    """CUDA kernel ms per step of everything a torch.profiler run saw, and its ten largest kernels'."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3 / steps
    top = {}
    for e in events[:10]:  # names cut short can meet: their times add up
        top[e.key[:90]] = top.get(e.key[:90], 0.0) + e.self_device_time_total / 1e3 / steps
    return total, top


def bench_train_markdown(data: dict) -> str:
    """bench_train.json as a Markdown table (bench-train writes it beside the JSON)."""
    meta = data["meta"]
    lines = [f"Trainer images/s of the study's runs on the real data ({meta['device']}, commit {meta['commit']}, "
             f"torch {meta['torch']}, recipe {meta['recipe']}; `python -m experiments.fashion_mnist.study "
             f"bench-train`): median of the logged rates after the first two rows.", "",
             "| run | batch | mode | images/s | peak GiB | kernel ms / step | wall ms / step |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            error = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['setting']} | | | {error} | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        kernel = f"{r['kernel_ms_per_step']:.1f}" if "kernel_ms_per_step" in r else ""
        wall = f"{r['wall_ms_per_step']:.1f}" if "wall_ms_per_step" in r else ""
        lines.append(f"| {r['item']} | {r['batch_size']} | {r['mode']} | {r['img_s']:.0f} | {peak} | {kernel} "
                     f"| {wall} |")
    return "\n".join(lines) + "\n"


def _write_bench(out: Path, meta: dict, rows: list) -> None:
    """bench_train.json and .md, after every row: a call cut off keeps the rows it timed."""
    data = dict(meta=meta, rows=rows)
    _write_results(out / "bench_train.json", data)
    (out / "bench_train.md").write_text(bench_train_markdown(data))


def bench_train(recipe_name: str, out: Path, settings: list[str], steps: int = 60, profile: bool = False) -> list:
    """Training images/s of the study's runs through the library's trainer on the real data (loader, logging,
    clipping and all), for each setting "ITEM:BATCH:MODE": ITEM an arm (its pretraining) or an evaluation,
    MODE eager, compile or reduce-overhead (compile with CUDA graphs). Each runs `steps` optimizer steps; the
    rate is the median of the logged rows after the first two (compilation and warm-up). With `profile`, the
    run's CUDA kernel time over its steps (warm-up and a fine-tune's final evaluation included) is recorded
    beside the wall time per step: a step whose kernels fill much less than its wall time is bound by the host
    (launches, syncs, data), not by the GPU. Writes out/bench_train.json and .md (`--render JSON` rebuilds the
    .md of one that came back alone)."""
    if profile and not torch.cuda.is_available():
        raise SystemExit("bench-train --profile counts CUDA kernel time and needs a CUDA GPU")
    recipe, rows = RECIPES[recipe_name], []
    meta = dict(recipe=recipe_id(recipe_name), **environment())
    out.mkdir(parents=True, exist_ok=True)
    for setting in settings:
        item, batch, mode = setting.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = (eval_config(recipe, item, 0, Path(tmp), None) if item in EVALS
                   else pretrain_config(recipe, item, 0, Path(tmp)))
            flags = ["--optim.batch_size", batch, "--max_steps", str(steps), "--log_every", "5"]
            if mode != "eager":
                flags += ["--compile"] + (["--compile_mode", mode] if mode != "compile" else [])
            cfg = apply_overrides(cfg, flags)
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                if profile:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        run(cfg)
                else:
                    run(cfg)
            except Exception as err:  # record it, keep the other settings
                rows.append(dict(setting=setting, error=f"{type(err).__name__}: {str(err)[:200]}"))
                print(f"[study] bench-train {setting}: {rows[-1]['error']}", flush=True)
                _write_bench(out, meta, rows)
                continue
            rates = [float(r["train/img_s"]) for r in _train_rows(Path(tmp)) if r.get("train/img_s")]
            row = dict(setting=setting, item=item, batch_size=int(batch), mode=mode, steps=steps,
                       img_s=statistics.median(rates[2:] or rates), wall_s=time.perf_counter() - start,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
            if profile:
                row["kernel_ms_per_step"], row["top_kernels_ms_per_step"] = _kernel_times(prof, steps)
                row["wall_ms_per_step"] = 1e3 * int(batch) / row["img_s"]
        rows.append(row)
        print(f"[study] bench-train {json.dumps(row)}", flush=True)
        _write_bench(out, meta, rows)
    return rows


def carry_over(recipe_name: str, out: Path, source: str, items) -> int:
    """Copy `source`'s results of `items` to this recipe's keys, for items whose settings did not change
    between the two recipes (the caller vouches for that; recipe comments say why). Each copy names its
    source. Returns how many entries were copied."""
    results, rid = load_results(out / "results.json"), recipe_id(recipe_name)
    if not any(key.startswith(source + "/") for key in results):
        raise SystemExit(f"carry-over: no results of recipe {source!r} in {out / 'results.json'}")
    copied = 0
    for key, entry in results.items():
        parts = key.split("/")
        if parts[0] != source or len(parts) != 4 or parts[3] not in items:
            continue
        new_key = "/".join([rid, *parts[1:]])
        if new_key not in results:
            save_result(out / "results.json", new_key, {**entry, "recipe": rid, "carried_from": source})
            copied += 1
    return copied


def merge(returned: Path, out: Path) -> dict:
    """Bring a GPU call's results home: `returned` is its fm.tgz (or the unpacked folder) holding results.json,
    curves/ and figures/. New items are added. An item recorded here and different there was run again by a
    call that started from an older results.json: the recorded one stays and the other is added to the key's
    list in reruns.json (the report compares them; no seed counts twice). The exception is a unit that the
    call pretrained again because its weights were gone, to finish evaluations missing here: its new
    pretraining entry, loss curve and picture replace the old ones, as they would have on the GPU machine (a
    pretraining repeated without finishing any evaluation is a repeat). Files are copied before results.json
    is written, so a merge that failed can be run again. An archive's start.json (gpu_call.sh writes it) is
    the results.json its shard started from: an entry still as it was there is not a repeat, whatever
    another shard of the call replaced meanwhile. Returns the keys per outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = returned
        if returned.is_file():
            try:
                with tarfile.open(returned) as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as err:
                raise SystemExit(f"merge: {returned} is not a readable tar archive ({err})") from None
            found = sorted(Path(tmp).glob("*/results.json")) + sorted(Path(tmp).glob("results.json"))
            folder = found[0].parent if found else Path(tmp)
        if not (folder / "results.json").is_file():
            raise SystemExit(f"merge: no results.json in {returned}")
        theirs, ours = load_results(folder / "results.json"), load_results(out / "results.json")
        start = load_results(folder / "start.json")
        added = sorted(k for k in theirs if k not in ours)
        differ = sorted(k for k in theirs if k in ours and theirs[k] != ours[k] and theirs[k] != start.get(k))
        finished_units = {k.rsplit("/", 1)[0] for k in added}
        replaced = [k for k in differ if k.endswith("/pretrain") and k.rsplit("/", 1)[0] in finished_units]
        reruns = [k for k in differ if k not in replaced]
        for key in added + replaced:  # first the curves and pictures of the pretrainings taken
            if not key.endswith("/pretrain"):  # (loader keys end in a device name)
                continue
            rid, arm, unit_seed, _ = key.split("/")
            seed = int(unit_seed[1:])  # "s0" -> 0
            files = [curve_file(rid, arm, seed)] + ([picture_file(rid, arm)] if seed == 0 else [])
            for name in files:
                if (folder / name).is_file():
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(folder / name, out / name)
        if reruns:  # every repeat of a key is kept, once
            again = load_results(out / "reruns.json")
            for key in reruns:
                if theirs[key] not in again.setdefault(key, []):
                    again[key].append(theirs[key])
            _write_results(out / "reruns.json", again)
        ours.update({k: theirs[k] for k in added + replaced})
        _write_results(out / "results.json", ours)  # last: a merge that failed before can be run again
    missing = sorted(k for k in ours if k not in theirs)
    print(f"[study] merged {returned}: {len(added)} new, {len(replaced)} pretrainings replaced (units pretrained "
          f"again to finish them), {len(reruns)} run again (kept in reruns.json)")
    if missing:
        print(f"[study] {len(missing)} results here were not in the returned file: another shard's, or that call "
              "started from an older results.json (then its repeats are the 'run again' ones)")
    return dict(added=added, replaced=replaced, reruns=reruns, missing=missing)


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, e.g. 0/2; got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def shard_units(units, recipe_name: str, out: Path, shard: tuple[int, int]) -> list:
    """Every N-th of the units that still have work, from the I-th: shards started from the same results.json
    take disjoint units, and each gets its share of the remaining work rather than of the finished."""
    results, rid = load_results(out / "results.json"), recipe_id(recipe_name)
    unfinished = [(a, s) for a, s in units if not unit_done(results, rid, a, s)]
    index, count = shard
    return unfinished[index::count]


def status(recipe_name: str, out: Path) -> None:
    results, rid = load_results(out / "results.json"), recipe_id(recipe_name)
    for stage, units in STAGES.items():
        done = sum(item_key(rid, a, s, i) in results for a, s in units for i in unit_items(a))
        total = sum(len(unit_items(a)) for a, _ in units)
        print(f"stage {stage}: {done}/{total} items done ({', '.join(f'{a} s{s}' for a, s in units)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("run", "status", "bench-loader", "bench-train", "carry-over", "merge"))
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), help="run this stage's units")
    parser.add_argument("--next", action="store_true", help="run the unfinished units of every stage, in order")
    parser.add_argument("--budget-min", type=float, default=None, help="start no work that would end past this")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                        help="run only every N-th unfinished unit, from the I-th (one shard per GPU, each with its "
                             "own --out and --runs; merge each)")
    parser.add_argument("--items", nargs="+", choices=("pretrain", *EVALS), default=None,
                        help="run only these items of each unit (and the pretraining they need)")
    parser.add_argument("--recipe", default="h100", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json, curves/ and figures/ go")
    parser.add_argument("--runs", type=Path, default=HERE / "runs",
                        help="scratch space for the runs' weights (in a subfolder per recipe id)")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=["star_k4:512:eager"],
                        metavar="ITEM:BATCH:MODE",
                        help="bench-train: what to time, e.g. star_k4:2048:reduce-overhead ft100:1024:eager")
    parser.add_argument("--steps", type=int, default=60, help="bench-train: optimizer steps per setting")
    parser.add_argument("--profile", action="store_true", help="bench-train: also CUDA kernel time per step")
    parser.add_argument("--render", type=Path, metavar="JSON", help="bench-train: only rebuild the .md of this JSON")
    parser.add_argument("--source", help="carry-over: the recipe id whose results of --items are copied")
    parser.add_argument("--returned", type=Path, nargs="+",
                        help="merge: a GPU call's fm.tgz files, one per shard (or their unpacked folders)")
    args = parser.parse_args(argv)
    if args.command == "merge":
        if args.returned is None:
            parser.error("merge needs --returned PATH [PATH ...] (a GPU call's fm*.tgz or their folders)")
        for returned in args.returned:
            merge(returned, args.out)
        return 0
    if args.command == "carry-over":
        if not args.source or not args.items:
            parser.error("carry-over needs --source RECIPE_ID and --items")
        print(f"carried over {carry_over(args.recipe, args.out, args.source, args.items)} results")
        return 0
    if args.command == "status":
        status(args.recipe, args.out)
        return 0
    if args.command == "bench-loader":
        bench_loader(args.recipe, args.out)
        return 0
    if args.command == "bench-train" and args.render:
        args.render.with_suffix(".md").write_text(bench_train_markdown(json.loads(args.render.read_text())))
        return 0
    if args.command == "bench-train":
        bench_train(args.recipe, args.out, args.settings, args.steps, args.profile)
        return 0
    if (args.stage is None) == (not args.next):
        parser.error("run needs exactly one of --stage N or --next")
    units = STAGES[args.stage] if args.stage else [u for stage in STAGES.values() for u in stage]
    if args.shard is not None:
        units = shard_units(units, args.recipe, args.out, args.shard)
        print(f"[study] shard {args.shard[0]}/{args.shard[1]}: {', '.join(f'{a} s{s}' for a, s in units) or 'nothing'}")
    budget = None if args.budget_min is None else 60 * args.budget_min
    finished = run_units(units, args.recipe, args.out, args.runs, budget, args.items,
                         shard=args.shard and "/".join(map(str, args.shard)))
    status(args.recipe, args.out)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
