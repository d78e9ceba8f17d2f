"""Build docs/results/fashion-mnist-long.md and its figures from the long study's long/results.json.

    python -m experiments.fashion_mnist.long_report [--out docs/results]

Every number on the page is computed from the recorded entries, so it is rebuilt after every call and says
how far the study has got: a verdict needs 3 seeds of both sides, and until then the page says so. The
criterion is the first study's (stats.py): a difference counts when it is more than 2 standard deviations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import long  # noqa: E402
from .recipes import (LONG_ARMS, LONG_FT_ARMS, LONG_FT_RECIPES, LONG_RECIPES, LONG_SNAPSHOT_EVALS,  # noqa: E402
                      LONG_UNITS, SEEDS, ft_recipe_id, recipe_id)
from .report import fmt  # noqa: E402
from .stats import beyond, margin, mean_std  # noqa: E402
from .study import HERE, item_key, load_results  # noqa: E402

REPO = HERE.parents[1]
TARGET_TOP1 = 94.0  # the goal for the best full fine-tune
BUDGET_MIN = 150  # GPU minutes past which the issue cuts the single-seed arms
NAMES = {"arm_k1": "ARM (K=1)", "star_k4": "STAR (K=4)", "star_k4_seqwin": "STAR K=4, whole-sequence decoder window",
         "star_k16": "STAR (K=16)", "scratch": "no pretraining"}
EVAL_NAMES = {"linprobe": "linear probe", "ft1": "1%-label fine-tune", "ft100": "full fine-tune"}
CLAIM = ("star_k4", "arm_k1")
COLORS = {arm: f"C{i}" for i, arm in enumerate(["scratch", *LONG_ARMS])}  # one colour per arm in every figure


def snapshot_values(results: dict, rid: str, arm: str, item: str, epoch: int) -> list[float]:
    """Test top-1 of one evaluation of one arm's epoch-`epoch` snapshot, in seed order, recorded seeds only."""
    keys = [item_key(rid, arm, seed, f"{item}_e{epoch}") for seed in SEEDS]
    return [results[k]["test_top1"] for k in keys if k in results]


def verdict(a: list[float], b: list[float], name_a: str, name_b: str) -> str:
    """The 2-std verdict of a against b, or what it still waits for."""
    if len(a) < 3 or len(b) < 3:
        lead = f"; so far {statistics.mean(a) - statistics.mean(b):+.2f} points" if a and b else ""
        return f"no verdict yet ({name_a} {len(a)} of 3 seeds, {name_b} {len(b)}){lead}"
    diff, spread = margin(a, b)
    if beyond(abs(diff), spread):
        return f"**{name_a if diff > 0 else name_b} ahead** by {abs(diff):.2f} points ({abs(diff) / spread:.1f} std)"
    return f"within 2 std: no difference shown ({diff:+.2f} points, std {spread:.2f})"


def plot_snapshots(results: dict, rid: str, epochs, path: Path) -> bool:
    """Test top-1 against pretraining epochs, one panel per evaluation, one line per arm (mean ± std over seeds,
    every seed as a dot)."""
    fig, axes = plt.subplots(1, len(LONG_SNAPSHOT_EVALS), figsize=(10, 3.6))
    drawn = False
    for ax, item in zip(axes, LONG_SNAPSHOT_EVALS):
        for arm in LONG_ARMS:
            points = [(e, snapshot_values(results, rid, arm, item, e)) for e in epochs]
            points = [(e, v) for e, v in points if v]
            if not points:
                continue
            drawn = True
            spread = [mean_std(v)[1] if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar([e for e, _ in points], [statistics.mean(v) for _, v in points], yerr=spread, marker="o",
                        capsize=3, color=COLORS[arm], label=NAMES[arm])
            for e, v in points:
                ax.scatter([e] * len(v), v, color=COLORS[arm], s=10, alpha=0.5)
        ax.set(title=EVAL_NAMES[item], xlabel="pretraining epochs", xticks=list(epochs))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_holdout(results: dict, ft_rid: str, ft: dict, path: Path) -> bool:
    """Holdout top-1 of the fine-tune search against fine-tuning epochs per arm: the ladder as a line, the
    variants at variant_epochs as labelled points."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    labelled = set()
    for arm in LONG_FT_ARMS:
        rungs = [(e, results.get(item_key(ft_rid, arm, 0, f"tune_e{e}"))) for e in ft["ladder"]]
        rungs = [(e, r["val_top1"]) for e, r in rungs if r]
        if not rungs:
            continue
        drawn = True
        ax.plot(*zip(*rungs), marker="o", color=COLORS[arm], label=NAMES[arm])
        for j, name in enumerate(ft["variants"]):
            entry = results.get(item_key(ft_rid, arm, 0, f"tune_{name}"))
            if entry:
                ax.scatter([ft["variant_epochs"]], [entry["val_top1"]], color=COLORS[arm], marker="xv^s"[j % 4], s=30,
                           label=None if name in labelled else f"variant {name}")
                labelled.add(name)
    ax.set(xlabel="fine-tuning epochs", ylabel="holdout top-1 (%)", xticks=list(ft["ladder"]),
           title="Full fine-tune on the holdout, seed 0 (markers: variants)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def gpu_minutes(results: dict, rid: str, ft_rid: str) -> dict:
    """GPU minutes by stage, from the entries' wall times; the evaluations beside a pretraining overlap it and
    are counted apart (they take no GPU time of their own)."""
    mine = [e for k, e in results.items() if k.startswith((rid + "/", ft_rid + "/"))]
    stages = {"pretraining": [e for e in mine if e["item"] == "pretrain"],
              "snapshot evaluations after the pretraining": [e for e in mine if not e.get("beside_pretraining")
                                                             and e["item"].split("_e")[0] in LONG_SNAPSHOT_EVALS],
              "pretraining again for lost encoders": [e for e in mine if e["item"].startswith(long.REBUILD)],
              "fine-tune search (holdout)": [e for e in mine if e["item"].startswith("tune_")],
              "final full fine-tunes": [e for e in mine if e["item"] == "ft100"]}
    minutes = {name: sum(e["wall_s"] for e in entries) / 60 for name, entries in stages.items()}
    minutes["beside"] = sum(e["wall_s"] for e in mine if e.get("beside_pretraining")) / 60
    return minutes


def minutes_left(results: dict, recipe: dict, rid: str, ft: dict, ft_rid: str) -> dict:
    """An upper bound on the GPU minutes still to spend, by stage, with the scheduler's own estimates (1.1x and
    20 s per run): every unit not done at the slowest measured unit, and for the fine-tune search every run it
    could still take (each rung, each variant, one pair at the ladder's top), then 3 seeds of each arm's choice
    (or of the ladder's top while it is open). Encoders do not outlive a device session, so each recorded unit whose
    encoder a fine-tune still needs is counted as pretrained once more (`long.py run --rebuild`), whether or not its
    encoder is at home now; a unit whose fine-tunes span sessions pays more than that."""
    units = [(a, s) for a, s in LONG_UNITS if any(item_key(rid, a, s, i) not in results
                                                  for i in ["pretrain", *long.snapshot_items(recipe)])]
    per_unit = long.estimate(results, rid, recipe, "pretrain", "star_k4") + sum(
        long.estimate(results, rid, recipe, f"{i}_e{recipe['snapshots'][-1]}", "star_k4") for i in LONG_SNAPSHOT_EVALS)

    def run_s(epochs):
        return long.finetune_estimate(results, ft_rid, ft, epochs)

    search, finals, rebuilds = 0.0, 0.0, set()
    for arm in LONG_FT_ARMS:
        recorded = {k.rsplit("/", 1)[1] for k in results if k.startswith(f"{ft_rid}/{arm}/s0/tune_")}
        todo = long.next_finetunes(ft, results, ft_rid, arm)
        if not todo:
            continue
        if arm in LONG_ARMS:  # a pretrained arm: the seeds whose fine-tunes are left need their units' encoders
            rebuilds |= {(arm, s) for s in ({0, *SEEDS} if todo[0][1] != "ft100" else {s for s, _ in todo})
                         if item_key(rid, arm, s, "pretrain") in results}
        if todo[0][1] != "ft100":  # the search is open: every run it could still take
            wanted = [(f"tune_e{e}", e) for e in ft["ladder"]] + [(f"tune_{v}", ft["variant_epochs"])
                                                                  for v in ft["variants"]]
            search += sum(run_s(e) for item, e in wanted if item not in recorded) + run_s(ft["ladder"][-1])
            finals += sum(item_key(ft_rid, arm, s, "ft100") not in results for s in SEEDS) * run_s(ft["ladder"][-1])
        else:
            finals += len(todo) * run_s(long.finetune_choice(ft, results, ft_rid, arm)["epochs"])
    rebuild_s = sum(long.estimate(results, rid, recipe, "pretrain", arm) for arm, _ in rebuilds)
    return {"pretraining units": len(units) * per_unit / 60, "pretraining again for lost encoders": rebuild_s / 60,
            "fine-tune search": search / 60, "final full fine-tunes": finals / 60}


def build(out: Path, results: dict) -> str:
    recipe_name = "long-h100"
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    ft_name = long.finetune_recipe(recipe_name)
    ft, ft_rid = LONG_FT_RECIPES[ft_name], ft_recipe_id(ft_name)
    epochs = recipe["snapshots"]
    figures = out / "fashion-mnist-long"
    figures.mkdir(parents=True, exist_ok=True)
    units_done = [(a, s) for a, s in LONG_UNITS if all(item_key(rid, a, s, i) in results
                                                       for i in ["pretrain", *long.snapshot_items(recipe)])]
    mine = {k: e for k, e in results.items() if k.startswith((rid + "/", ft_rid + "/"))}
    commits = sorted({e["commit"] for e in mine.values()})
    devices = sorted({e["device"] for e in mine.values()})
    lines = [
        "# Fashion-MNIST: STAR vs ARM after 25, 50 and 100 pretraining epochs",
        "",
        "Built by `python -m experiments.fashion_mnist.long_report` from "
        "[experiments/fashion_mnist/long/results.json](../../experiments/fashion_mnist/long/results.json); "
        "the runs are `experiments/fashion_mnist/long.py`'s (recipes `long-h100` and `long-ft-h100` in "
        "[recipes.py](../../experiments/fashion_mnist/recipes.py)).",
        "",
        f"**Status:** {len(units_done)} of {len(LONG_UNITS)} pretraining units done "
        f"({', '.join(f'{NAMES[a]} seed {s}' for a, s in units_done) or 'none'}); the single-seed units run "
        f"after the full fine-tunes, as the first cut should the plan pass about {BUDGET_MIN} GPU minutes. Code at "
        f"{', '.join(commits) or '-'}; {', '.join(devices) or '-'}. Until every cell has 3 seeds the numbers "
        "are a first signal, not a result.",
        "",
        "star_tiny at 32 px (patch 4, clusters of 2x2 patches), pretrained on the 60k training images for 100 "
        f"epochs at batch {recipe['pretrain']['batch_size']} (blr {recipe['pretrain']['blr']}, warm-up "
        f"{recipe['pretrain']['warmup_epochs']} epochs, CUDA graphs), with the model kept at epochs "
        f"{', '.join(map(str, epochs))}. Each snapshot gets the first study's linear probe and 1%-label "
        "fine-tune, selected on nothing and measured once on the test split. STAR's decoder reads each image's "
        "own tokens (the per-image window); the single-seed arm with the whole-sequence window is the first study's "
        "setting.",
        "",
        "## Linear probe and 1%-label fine-tune against pretraining epochs",
        "",
        "Test top-1 (%), mean ± std over seeds (n):",
        "",
        "| arm | evaluation | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
        "|---|---|" + "---|" * len(epochs),
    ]
    for arm in LONG_ARMS:
        for item in LONG_SNAPSHOT_EVALS:
            lines.append(f"| {NAMES[arm]} | {EVAL_NAMES[item]} | "
                         + " | ".join(fmt(snapshot_values(results, rid, arm, item, e)) for e in epochs) + " |")
    first = load_results(HERE / "results.json")
    first_rid = recipe_id("h100")
    none = {item: [first[k]["test_top1"] for k in (item_key(first_rid, "scratch", s, item) for s in SEEDS)
                   if k in first] for item in LONG_SNAPSHOT_EVALS}
    lines += ["", "No pretraining, from the first study (the same evaluation recipes and test split; the linear "
              "probe of a random encoder, the 1%-label fine-tune from random weights with 4 more epochs): "
              + ", ".join(f"{EVAL_NAMES[i]} {fmt(none[i])}" for i in LONG_SNAPSHOT_EVALS) + "."]
    if plot_snapshots(results, rid, epochs, figures / "accuracy_vs_epochs.png"):
        lines += ["", "![accuracy against pretraining epochs](fashion-mnist-long/accuracy_vs_epochs.png)"]
    lines += ["", "### Verdicts (2 std)", ""]
    for item in LONG_SNAPSHOT_EVALS:
        for e in epochs:
            star, arm_ = (snapshot_values(results, rid, a, item, e) for a in CLAIM)
            lines.append(f"- {EVAL_NAMES[item]}, {e} epochs: STAR vs ARM: {verdict(star, arm_, 'STAR', 'ARM')}; "
                         f"STAR vs none: {verdict(star, none[item], 'STAR', 'no pretraining')}; "
                         f"ARM vs none: {verdict(arm_, none[item], 'ARM', 'no pretraining')}.")
    lines += full_finetune(results, ft_rid, ft, figures)
    minutes = gpu_minutes(results, rid, ft_rid)
    total = sum(v for k, v in minutes.items() if k != "beside")
    lines += ["", "## GPU time", "", "| stage | GPU minutes so far |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in minutes.items() if k != "beside"]
    lines += [f"| total | {total:.1f} |", "",
              "The evaluations of the 25- and 50-epoch snapshots ran beside their pretraining "
              f"({minutes['beside']:.1f} minutes of wall time, inside the pretraining's). The issue's budget is about "
              f"{BUDGET_MIN} GPU minutes. Not counted here: each device call's start-up and packing, and a fine-tune's "
              "test pass and encoder unpacking (seconds each)."]
    lines += rebuilds(results, rid, ft_rid)
    left = minutes_left(results, recipe, rid, ft, ft_rid)
    lines += ["", "Left, by the scheduler's estimates (`minutes_left`: every run the fine-tune search could still take,"
              " and one rebuild for each lost encoder a fine-tune still needs): "
              + ", ".join(f"{k} {v:.0f}" for k, v in left.items())
              + f" GPU minutes; with what is spent, about {total + sum(left.values()):.0f} of the {BUDGET_MIN}."
              + ("" if any("images_per_epoch" in e for k, e in results.items() if k.startswith(ft_rid + "/")) else
                 " The fine-tune estimates are high until a fine-tune has recorded its images per epoch (none so far"
                 " has): they take the slowest seconds per epoch, compilation spread in.")]
    return "\n".join(lines) + "\n"


def rebuilds(results: dict, rid: str, ft_rid: str) -> list[str]:
    """The units pretrained again for a lost encoder (`long.py run --rebuild`): how close each came to the recorded
    run, and what was measured from its encoder."""
    again = {k: e for k, e in results.items() if k.startswith(rid + "/") and e["item"].startswith(long.REBUILD)}
    if not again:
        return []
    lines = ["", "## Encoders pretrained again", "",
             "Encoders do not outlive a device session, so a unit whose encoder a later session needs is pretrained "
             "again with its recipe and seed (`long.py run --rebuild`). Its encoder is taken only if the loss lies "
             f"within {long.REBUILD_RTOL:g} (relative) of the recorded run at every logged step and at the end; what "
             "is measured from it is recorded with `encoder: rebuild<N>`; what was recorded before stays that of the "
             "first encoder.", "",
             "| unit | item | commit | taken | bit for bit | largest relative difference | first step that differs | "
             "results from its encoder |", "|---|---|---|---|---|---|---|---|"]
    for key, e in sorted(again.items()):
        _, arm, seed, item = key.split("/")
        used = sum(1 for k, r in results.items() if k.startswith((f"{rid}/{arm}/{seed}/", f"{ft_rid}/{arm}/{seed}/"))
                   and r.get("encoder") == item)
        worst = e.get("max_rel_difference")  # not recorded by the first rebuild, which was compared bit for bit
        first = e["first_difference"]
        differs = "-" if first is None else "{step} ({loss:.7f} against {recorded_loss:.7f})".format(**first)
        lines.append(f"| {NAMES[arm]} {seed} | {item} | {e['commit']} | {'yes' if e['matched'] else 'no'} | "
                     f"{'yes' if e.get('bitwise', first is None) else 'no'} | "
                     f"{'-' if worst is None else format(worst, '.1e')} | {differs} | {used} |")
    if any("rtol" not in e for e in again.values()):
        lines += ["", "A row without its largest difference ran when only a bit-for-bit repeat was taken."]
    return lines


def full_finetune(results: dict, ft_rid: str, ft: dict, figures: Path) -> list[str]:
    lines = ["", "## Full fine-tune", "",
             f"Chosen on the 5k holdout from seed 0's 100-epoch encoder (no pretraining: random weights), the same "
             f"search for every arm: the epochs ladder {', '.join(map(str, ft['ladder']))} at the base settings "
             f"(batch {ft['base']['batch_size']}, blr {ft['base']['blr']}, layer decay {ft['base']['layer_decay']}; "
             f"a rung only while the one before gained {ft['gain']} points), then each variant at "
             f"{ft['variant_epochs']} epochs ({', '.join(ft['variants'])}); where the best variant and the best rung "
             "differ in epochs, that pair runs too and is chosen only if it beats the rung. The choice then runs on "
             "every seed and is measured once on the test split.", "",
             "| arm | run | epochs | holdout top-1 | minutes |", "|---|---|---|---|---|"]
    for arm in LONG_FT_ARMS:
        runs = [e for k, e in results.items() if k.startswith(f"{ft_rid}/{arm}/s0/tune_")]
        for entry in sorted(runs, key=lambda e: (e["epochs"], e["item"])):
            lines.append(f"| {NAMES[arm]} | {entry['item'].removeprefix('tune_')} | {entry['epochs']} | "
                         f"{entry['val_top1']:.2f} | {entry['wall_s'] / 60:.1f} |")
    if plot_holdout(results, ft_rid, ft, figures / "finetune_holdout.png"):
        lines += ["", "![holdout top-1 of the fine-tune search](fashion-mnist-long/finetune_holdout.png)"]
    finals = {arm: [results[k] for k in (item_key(ft_rid, arm, s, "ft100") for s in SEEDS) if k in results]
              for arm in LONG_FT_ARMS}
    lines += ["", "Test top-1 of the final fine-tunes:", ""]
    for arm in LONG_FT_ARMS:
        if long.still_gaining(ft, results, ft_rid, arm):
            lines.append(f"- {NAMES[arm]}: the ladder's last rung ({ft['ladder'][-1]} epochs) still gained "
                         f"{ft['gain']} points or more: the search stopped at the ladder's end, not where more epochs "
                         "stop helping (100 epochs do not fit a device call).")
    for arm in LONG_FT_ARMS:
        choice = finals[arm][0]["choice"] if finals[arm] else None
        todo = long.next_finetunes(ft, results, ft_rid, arm)
        lines.append(f"- {NAMES[arm]}: {fmt([e['test_top1'] for e in finals[arm]])}"
                     + (f", {choice['epochs']} epochs, settings {choice['variant']} (holdout "
                        f"{choice['holdout_top1']:.2f})" if choice else "")
                     + (f"; next: {todo[0][1]} seed {todo[0][0]}" if todo else ""))
    done = {arm: [e["test_top1"] for e in v] for arm, v in finals.items() if v}
    if done:
        ranked = sorted(done, key=lambda a: statistics.mean(done[a]), reverse=True)
        best, mean = ranked[0], statistics.mean(done[ranked[0]])
        goal = "met" if mean >= TARGET_TOP1 else f"missed by {TARGET_TOP1 - mean:.2f} points"
        provisional = "" if len(done[best]) == 3 else f", provisional: {len(done[best])} of 3 seeds"
        against = ""
        if len(ranked) > 1:
            second = ranked[1]
            against = f"; against {NAMES[second]}: {verdict(done[best], done[second], NAMES[best], NAMES[second])}"
        lines.append(f"- Best full fine-tune: {NAMES[best]}, {mean:.2f}% test top-1 (mean of {len(done[best])} "
                     f"seed{'s' * (len(done[best]) > 1)}{provisional}); the {TARGET_TOP1}% goal is {goal}{against}.")
        for arm in ("arm_k1", "star_k4"):
            if arm in done and "scratch" in done:
                lines.append(f"- {NAMES[arm]} vs no pretraining: "
                             f"{verdict(done[arm], done['scratch'], NAMES[arm], 'no pretraining')}.")
    else:
        lines.append("- Best full fine-tune: none measured yet.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--results", type=Path, default=long.HERE / "results.json")
    args = parser.parse_args(argv)
    page = build(args.out, load_results(args.results))
    (args.out / "fashion-mnist-long.md").write_text(page)
    print(f"wrote {args.out / 'fashion-mnist-long.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
