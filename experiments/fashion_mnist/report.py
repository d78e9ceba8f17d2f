"""Build docs/results/fashion-mnist.md and its PNGs from the study's results.json, curves/ and figures/.

    python -m experiments.fashion_mnist.report [--recipe h100] [--out docs/results]

Everything in the page is computed from the recorded results, so it can be rebuilt after every stage; the
verdict says which of the issue's criteria the numbers meet so far, and "not enough seeds" while an arm has
fewer than three. The words are report_template.md's, the statistics stats.py's; this file picks and fills.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from .plots import plot_accuracy_vs_k, plot_losses
from .recipes import ARMS, EVALS, K_SWEEP, RECIPES, SEEDS, STAGES, recipe_id
from .stats import beyond, log2_slope, margin, mean_std, past_zero, relative_size, trend
from .study import HERE, estimate, item_key, load_results, picture_file, unit_items
from .template import ARM_NAMES, EVAL_NAMES, block, say

REPO = HERE.parents[1]
TARGET_TOP1 = 95.0
ISSUE_BUDGET_MIN = 60  # GPU minutes the issue sizes the whole study to
# The GPUs of the machine that the calls at these commits shared, one run per GPU, from before results.json
# entries recorded their shard.
GPUS_BY_COMMIT = json.loads((HERE / "gpus_by_commit.json").read_text())


def collect(results: dict, rid: str) -> dict:
    """{(arm, item): [entry per seed, in seed order]} for one recipe."""
    table = {}
    for arm in ARMS:
        for item in ("pretrain", *EVALS):
            entries = [results.get(f"{rid}/{arm}/s{seed}/{item}") for seed in SEEDS]
            table[arm, item] = [e for e in entries if e is not None]
    return table


def pretrained_again(table: dict) -> list[str]:
    """Caveat lines for encoders pretrained twice: a call that finds a unit's weights gone pretrains it again
    (same seed and recipe), so evaluations finished before the newest pretraining used the earlier encoder."""
    lines = []
    for arm in ARMS:
        for pretrain in table[arm, "pretrain"]:
            earlier = [EVAL_NAMES[item] for item in EVALS for e in table[arm, item]
                       if e["seed"] == pretrain["seed"] and e["finished"] < pretrain["finished"]]
            if earlier:
                picture = say("caveats.pretrained_again.picture") if pretrain["seed"] == 0 else ""
                lines.append(say("caveats.pretrained_again", arm=ARM_NAMES[arm], seed=pretrain["seed"],
                                 earlier=", ".join(earlier), picture=picture))
    return lines


def preliminary(table: dict, arm: str, item: str = "ft100") -> str:
    """"; preliminary: n of 3 seeds" while an arm's evaluation has fewer than 3 seeds, else nothing."""
    n = len(table[arm, item])
    return say("preliminary", n=n) if n < 3 else ""


def commits(entries: list) -> str:
    """Caveat line: the code versions the results come from (the recipe id pins settings, not code)."""
    count: dict[str, list[int]] = {}
    for e in entries:
        if e.get("item") in ("pretrain", *EVALS):
            count.setdefault(e["commit"], [0, 0])[("carried_from" in e)] += 1
    listed = ", ".join(say("caveats.commits.commit", commit=c, items=n + m,
                           carried=say("caveats.commits.carried", n=m) if m else "")
                       for c, (n, m) in sorted(count.items(), key=lambda kv: -sum(kv[1])))
    return say("caveats.commits", commits=listed)


def cards(table: dict) -> list[str]:
    """Caveat line when the pretraining timings of the table come from more than one card."""
    runs = [(arm, e["seed"], e["device"]) for arm in ARMS for e in table[arm, "pretrain"]]
    if len({device for _, _, device in runs}) < 2:
        return []
    per_arm = "; ".join(
        say("caveats.cards.arm", arm=ARM_NAMES[arm], runs=", ".join(
            say("caveats.cards.run", seed=seed, device=device) for a, seed, device in runs if a == arm))
        for arm in ARMS if any(a == arm for a, _, _ in runs))
    return [say("caveats.cards", runs=per_arm)]


def shared_machines(entries: list) -> list[str]:
    """Caveat line for the items that ran on a machine with several GPUs next to other jobs on the other GPUs,
    with their pretraining speed next to that of the runs that had a machine to themselves on the same card."""
    def gpus(e):  # GPUs of the machine the entry ran on, when it shared one
        return int(e["shard"].split("/")[1]) if "shard" in e else GPUS_BY_COMMIT.get(e.get("commit"), 1)
    ours = [e for e in entries if e.get("item") in ("pretrain", *EVALS)]
    shared = [e for e in ours if gpus(e) > 1]
    if not shared:
        return []
    devices = sorted({e["device"] for e in shared})
    pretrain = [e for e in ours if e["item"] == "pretrain" and e["device"] in devices]
    there = [e["img_s"] for e in pretrain if gpus(e) > 1]
    alone = [e for e in pretrain if gpus(e) == 1]
    speeds = ""
    if there and alone:
        names = ", ".join(say("caveats.shared.run", arm=ARM_NAMES[e["arm"]], seed=e["seed"]) for e in alone)
        alone_s = [e["img_s"] for e in alone]
        speeds = say("caveats.shared.speeds", low=min(there), high=max(there), alone=names, alone_low=min(alone_s),
                     alone_high=max(alone_s))
    return [say("caveats.shared", count=len(shared), plural="s" if len(shared) != 1 else "",
                gpus="/".join(str(n) for n in sorted({gpus(e) for e in shared})), devices=", ".join(devices),
                commits=", ".join(sorted({e["commit"] for e in shared})), speeds=speeds)]


def reruns(study_dir: Path, results: dict) -> list[str]:
    """Section comparing the items run a second time with the same seed and settings (reruns.json, written by
    study.py merge) with their recorded results."""
    path = study_dir / "reruns.json"
    if not path.is_file():
        return []
    again = load_results(path)
    rows = [(results[key], e) for key, repeats in sorted(again.items()) for e in repeats
            if key in results and e.get("test_top1") is not None]
    if not rows:
        return []
    lines = block("reruns")
    for first, second in rows:
        lines.append(say("reruns.row", arm=ARM_NAMES[first["arm"]], seed=first["seed"],
                         evaluation=EVAL_NAMES[first["item"]], recorded=first["test_top1"], rerun=second["test_top1"],
                         diff=second["test_top1"] - first["test_top1"], device=first["device"],
                         commit=first["commit"], rerun_device=second["device"], rerun_commit=second["commit"]))
    return lines + [""]


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    spread = f" ± {std:.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread} (n={len(values)})"


def compare(table: dict, better: str, worse: str, item: str) -> str:
    """One line: mean difference, in units of the larger of the two standard deviations."""
    a = [e["test_top1"] for e in table[better, item]]
    b = [e["test_top1"] for e in table[worse, item]]
    if not a or not b:
        return say("compare.unmeasured", evaluation=EVAL_NAMES[item])
    diff = statistics.mean(a) - statistics.mean(b)
    line = say("compare", evaluation=EVAL_NAMES[item], better=statistics.mean(a), worse=statistics.mean(b), diff=diff)
    if min(len(a), len(b)) < 3:
        return line + say("compare.few_seeds", n_better=len(a), n_worse=len(b))
    spread = margin(a, b)[1]
    verdict = say("meets") if beyond(diff, spread) else say("fails")
    if spread == 0:
        return line + say("compare.no_spread", verdict=verdict)
    return line + say("compare.judged", ratio=diff / spread, spread=spread, verdict=verdict)


def conclusion(table: dict, full: dict) -> str:
    """The claim's test in one paragraph (it rests on the linear probe and the 1%-label fine-tune of STAR and
    ARM, 3 seeds each), or why it cannot be made yet; then what is still unmeasured."""
    claim_items = ("linprobe", "ft1")
    seeds = {arm: min(len(table[arm, item]) for item in claim_items) for arm in ("star_k4", "arm_k1")}
    short = [say("conclusion.untested.arm", arm=ARM_NAMES[a], n=n) for a, n in seeds.items() if n < 3]
    if short:
        return say("conclusion.untested", short=", ".join(short))

    def top1(arm, item):
        return [e["test_top1"] for e in table[arm, item]]
    wins = {item: margin(top1("star_k4", item), top1("arm_k1", item)) for item in claim_items}
    if all(beyond(d, s) for d, s in wins.values()):
        claim = say("conclusion.beats")
    elif all(d <= 0 for d, _ in wins.values()):
        claim = say("conclusion.behind")
        behind = [EVAL_NAMES[i] for i, (d, s) in wins.items() if beyond(-d, s)]
        if behind:
            claim += say("conclusion.behind.far", evaluations=" and the ".join(behind))
    else:
        claim = say("conclusion.unclear")
    text = say("conclusion.claim", claim=claim, margins="; ".join(
        say("conclusion.claim.margin", evaluation=EVAL_NAMES[i], diff=d, std=s) for i, (d, s) in wins.items()))
    if full:
        best = max(full, key=full.get)
        reached = say("conclusion.best.reached") if full[best] >= TARGET_TOP1 else say("conclusion.best.short")
        text += say("conclusion.best", top1=full[best], arm=ARM_NAMES[best], preliminary=preliminary(table, best),
                    reached=reached, target=TARGET_TOP1)
    fits = {item: k_slope(table, item) for item in claim_items}
    if all(fits.values()):
        falls = all(trend(slope, se) < 0 for slope, se, _ in fits.values())
        slopes = "; ".join(say("conclusion.k_sweep.slope", evaluation=EVAL_NAMES[i], slope=slope, se=se)
                           for i, (slope, se, _) in fits.items())
        called = say("conclusion.k_sweep.fall" if falls else "conclusion.k_sweep.mixed")
        note = "" if complete_k_sweep(table, claim_items) else say("conclusion.k_sweep.preliminary")
        text += say("conclusion.k_sweep", called=called, slopes=slopes, preliminary=note)
    pending = [say("conclusion.pending.item", evaluation=EVAL_NAMES[item], arm=ARM_NAMES[arm], n=len(table[arm, item]))
               for arm in ("star_k4", "arm_k1", "scratch") for item in EVALS if len(table[arm, item]) < 3]
    if pending:
        text += say("conclusion.pending", pending="; ".join(pending))
    return text


def k_slope(table: dict, item: str):
    """`item`'s test top-1 per doubling of K over every seed's result of the K sweep ((b) and (f)); see
    log2_slope."""
    return log2_slope([(ARMS[arm]["num_images"], e["test_top1"]) for arm in K_SWEEP for e in table[arm, item]])


def complete_k_sweep(table: dict, items) -> bool:
    """Whether every K of the sweep has 3 seeds of each of `items`."""
    return all(len(table[arm, item]) >= len(SEEDS) for arm in K_SWEEP for item in items)


def k_trend(table: dict, item: str) -> str:
    """How `item` moves with K: the means per K and the slope per doubling (a slope more than 2 standard errors
    from zero is called a trend)."""
    fit = k_slope(table, item)
    if fit is None:
        return say("k_trend.few", evaluation=EVAL_NAMES[item])
    slope, se, runs = fit
    measured = [arm for arm in K_SWEEP if table[arm, item]]
    means = ", ".join(say("k_trend.mean", k=ARMS[a]["num_images"],
                          mean=statistics.mean(e["test_top1"] for e in table[a, item])) for a in measured)
    called = say({-1: "k_trend.falls", 1: "k_trend.rises", 0: "k_trend.flat"}[trend(slope, se)])
    fewest = min(len(table[a, item]) for a in measured)
    note = "" if complete_k_sweep(table, [item]) else \
        say("k_trend.preliminary", measured=len(measured), values=len(K_SWEEP), fewest=fewest)
    return say("k_trend", evaluation=EVAL_NAMES[item], means=means, slope=slope, se=se, runs=runs, called=called,
               preliminary=note)


def ablations(table: dict, context_measured: bool = False) -> list[str]:
    """Verdict lines of the ablations: does the cluster separator matter at K=4 ((c) vs (d) and (e)), and how
    each evaluation moves with the number of images per sequence ((b) and the K sweep (f))."""
    lines = block("ablations") + [""]
    for other in ("k4_nosep", "k4_token"):
        for item in ("linprobe", "ft1"):
            lines.append(say("ablations.separator", arm=ARM_NAMES[other],
                             compare=compare(table, "star_k4", other, item)))
    lines += [""] + block("ablations.k") + [""]
    lines += [say("ablations.k_trend", trend=k_trend(table, item)) for item in EVALS]
    lines += [""] + block("ablations.reading", context=say(
        "ablations.context.measured" if context_measured else "ablations.context.pending"))
    return lines + [""]


def arms_above_zero(name: str, diffs: dict) -> tuple[str, list[str]]:
    """Line `name` for a difference per arm and seed: the range of the arms' means, then the arms above zero by
    more than 2 std (block `name.some`) or that there is none (`name.none`); and those arms."""
    means = [statistics.mean(d) for d in diffs.values()]
    above = [arm for arm, d in diffs.items() if past_zero(d, +1)]
    verdict = say(f"{name}.some", arms=", ".join(ARM_NAMES[a] for a in above)) if above else say(f"{name}.none")
    return say(name, low=min(means), high=max(means), verdict=verdict), above


def context(study_dir: Path, rid: str, table: dict) -> list[str]:
    """The section of context.py's measurements (context.json), if any: next-cluster loss by position in the
    sequence and the causal linear probe of an image alone and after other images, mean ± std over seeds, then
    what they say about the two explanations of the K trend."""
    entries = [e for k, e in load_results(study_dir / "context.json").items()
               if k.startswith(rid + "/") and "0" in e["probe_top1_by_prefix"]]
    by_arm = {arm: [e for e in entries if e["arm"] == arm] for arm in ARMS}
    by_arm = {arm: found for arm, found in by_arm.items() if found}
    if not by_arm:
        return []
    first = {arm: [e["loss_by_position"][0] for e in found] for arm, found in by_arm.items()}
    later = {arm: [statistics.mean(e["loss_by_position"][1:]) - e["loss_by_position"][0] for e in found]
             for arm, found in by_arm.items() if found[0]["num_images"] > 1}
    alone = {arm: [e["probe_top1_by_prefix"]["0"] for e in found] for arm, found in by_arm.items()}
    prefixes = sorted({m for e in entries for m in e["probe_top1_by_prefix"] if m != "0"}, key=int)
    after = {(arm, m): [e["probe_top1_by_prefix"][m] - e["probe_top1_by_prefix"]["0"] for e in found
                        if m in e["probe_top1_by_prefix"]] for arm, found in by_arm.items() for m in prefixes}
    after = {key: diffs for key, diffs in after.items() if diffs}
    own_context = {arm: after[arm, str(ARMS[arm]["num_images"] - 1)] for arm in by_arm
                   if ARMS[arm]["num_images"] > 1 and (arm, str(ARMS[arm]["num_images"] - 1)) in after}
    cards = sorted({say("context.card", device=e["device"], commit=e["commit"]) for e in entries})
    lines = block("context", cards=", ".join(cards))
    for arm in by_arm:
        moved = "; ".join(say("context.moved", m=m, diff=fmt(after[arm, m])) for m in prefixes
                          if (arm, m) in after) or "-"
        lines.append(say("context.row", arm=ARM_NAMES[arm], first=fmt(first[arm], 4), later=fmt(later.get(arm, []), 4),
                         alone=fmt(alone[arm]), moved=moved,
                         study=fmt([e["test_top1"] for e in table[arm, "linprobe"]])))
    lines += [""] + block("context.reading") + [""]

    few = [ARM_NAMES[arm] for arm, found in by_arm.items() if len(found) < len(SEEDS)]
    if few:  # a verdict of "no effect" needs a spread to be judged against
        lines.append(say("context.few_seeds", seeds=len(SEEDS), arms=", ".join(few)))
        return lines + [""]
    sweep = [arm for arm in K_SWEEP if arm in by_arm]
    fit = log2_slope([(ARMS[arm]["num_images"], v) for arm in sweep for v in first[arm]])
    rises = fit is not None and beyond(fit[0], fit[1])
    if fit is not None:
        means = ", ".join(say("context.first.mean", k=ARMS[a]["num_images"], mean=statistics.mean(first[a]))
                          for a in sweep)
        lines.append(say("context.first", means=means, slope=fit[0], se=fit[1], runs=fit[2],
                         verdict=say("context.first.rises" if rises else "context.first.flat")))
    hurt = helped = []
    if later:
        line, hurt = arms_above_zero("context.later", later)
        lines.append(line)
    if own_context:
        line, helped = arms_above_zero("context.prefix", own_context)
        lines.append(line)
    causal = log2_slope([(ARMS[arm]["num_images"], v) for arm in sweep for v in alone[arm]])
    study = k_slope(table, "linprobe")
    if causal is not None and study is not None:
        lines.append(say("context.probes", causal=causal[0], causal_se=causal[1], study=study[0], study_se=study[1],
                         size=say(f"context.probes.{relative_size(causal[0], study[0])}")))
    if {"star_k4", "arm_k1"} <= set(alone):
        star, arm = alone["star_k4"], alone["arm_k1"]
        gap, spread = margin(star, arm)
        study_star, study_arm = ([e["test_top1"] for e in table[a, "linprobe"]] for a in ("star_k4", "arm_k1"))
        ranking = ""
        if study_star and study_arm:
            study_gap = statistics.mean(study_star) - statistics.mean(study_arm)
            ranking = say("context.star_vs_arm.same" if gap * study_gap > 0 else "context.star_vs_arm.other")
        lines.append(say("context.star_vs_arm", star=statistics.mean(star), arm=statistics.mean(arm), gap=gap,
                         ratio=gap / spread, spread=spread, ranking=ranking))
    if rises and later and not hurt and own_context and not helped:
        lines.append(say("context.neither"))
    return lines + [""]


def tuning(study_dir: Path, table: dict) -> list[str]:
    """The holdout runs that chose the full fine-tuning recipe (tune.py), if recorded, and what the chosen
    recipe then reached on the test split."""
    runs = load_results(study_dir / "tune.json")
    if not runs:
        return []
    lines = block("tuning")
    for key, e in sorted(runs.items(), key=lambda kv: (kv[1]["optim"]["epochs"], -kv[1]["val_top1"])):
        o = e["optim"]
        lines.append(say("tuning.row", epochs=o["epochs"], batch_size=o["batch_size"], blr=o["blr"],
                         layer_decay=o.get("layer_decay", "-"), top1=e["val_top1"], img_s=e["img_s"],
                         wall_s=e["wall_s"], device=e["device"], commit=e["commit"], recipe=key.split("/")[0]))
    full = [e["test_top1"] for arm in ARMS for e in table[arm, "ft100"]]
    test = say("tuning.test", n=len(full), low=min(full), high=max(full), target=TARGET_TOP1) if full else ""
    return lines + ["", say("tuning.lesson", test=test), ""]


def sizing(results: dict, recipe_name: str) -> list[str]:
    """GPU time of the whole study: measured where an item ran, else estimated from measured items of the
    same kind (per epoch; pretraining per K) or the recipe's guess."""
    rid = recipe_id(recipe_name)
    done_s = todo_s = 0.0
    per_stage = []
    for stage, units in STAGES.items():
        stage_s = 0.0
        for arm, seed in units:
            for item in unit_items(arm):
                entry = results.get(item_key(rid, arm, seed, item))
                seconds = entry["wall_s"] if entry else estimate(results, recipe_name, arm, item)
                stage_s += seconds
                done_s += seconds if entry else 0
                todo_s += 0 if entry else seconds
        per_stage.append(say("budget.stage", stage=stage, minutes=stage_s / 60))
    total_min = (done_s + todo_s) / 60
    over = say("budget.over", ratio=total_min / ISSUE_BUDGET_MIN, budget=ISSUE_BUDGET_MIN) \
        if total_min > ISSUE_BUDGET_MIN else say("budget.within", budget=ISSUE_BUDGET_MIN)
    return block("budget", total=total_min, over=over, done=done_s / 60, todo=todo_s / 60,
                 stages=", ".join(per_stage)) + [""]


def build(recipe_name: str, study_dir: Path, out: Path) -> Path:
    results, rid = load_results(study_dir / "results.json"), recipe_id(recipe_name)
    recipe = RECIPES[recipe_name]
    table = collect(results, rid)
    figures = out / "fashion-mnist"
    figures.mkdir(parents=True, exist_ok=True)
    ours = [e for k, e in results.items() if k.startswith(rid + "/")]
    done = sum(item_key(rid, a, s, i) in results for st in STAGES.values() for a, s in st for i in unit_items(a))
    total = sum(len(unit_items(a)) for st in STAGES.values() for a, _ in st)

    lines = block("header", done=done, total=total, rid=rid,
                  status=say("header.complete" if done == total else "header.partial")) + [""]

    pre = recipe["pretrain"]
    evals = "; ".join(say("setup.eval", evaluation=EVAL_NAMES[k], **v) for k, v in recipe["evals"].items())
    lines += block("setup", val_size=recipe["val_size"], decoder_dim=recipe["model"].get("decoder_dim", 512),
                   evals=evals, **pre) + [""]

    lines += block("results", evaluations=" | ".join(EVAL_NAMES[e] for e in EVALS),
                   evaluation_rules="---|" * len(EVALS))
    for arm in ARMS:
        cells = [fmt([e["test_top1"] for e in table[arm, item]]) for item in EVALS]
        cells += [fmt([e[key] for e in table[arm, "pretrain"]], 0) for key in ("wall_s", "img_s")]
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cells) + " |")
    lines.append("")

    full = {arm: statistics.mean([e["test_top1"] for e in table[arm, "ft100"]]) for arm in ARMS if table[arm, "ft100"]}
    lines += block("verdict.complete" if done == total else "verdict.partial") + [""]
    if full:
        best = max(full, key=full.get)
        met = say("meets") if full[best] >= TARGET_TOP1 else say("fails")
        lines.append(say("verdict.best", arm=ARM_NAMES[best], top1=full[best], met=met, target=TARGET_TOP1,
                         preliminary=preliminary(table, best)))
        if best == "scratch":
            lines[-1] += say("verdict.best.scratch", epochs=pre["epochs"])
    for item in ("linprobe", "ft1", "ft10", "ft100"):
        lines.append(say("verdict.star_vs_arm", compare=compare(table, "star_k4", "arm_k1", item)))
    for item in ("ft1", "ft100"):
        lines.append(say("verdict.arm_vs_scratch", compare=compare(table, "arm_k1", "scratch", item)))
    lines.append("")

    lines += block("conclusion") + ["", conclusion(table, full), ""]
    measured = context(study_dir, rid, table)
    lines += ablations(table, bool(measured)) + measured
    lines += tuning(study_dir, table)
    lines += block("plots") + [""]
    batch = pre["batch_size"]
    if plot_losses(study_dir / "curves" / rid, batch, figures / "pretrain_loss.png"):
        lines += block("plots.loss", png=f"{figures.name}/pretrain_loss.png") + [""]
    if plot_accuracy_vs_k(table, figures / "accuracy_vs_k.png"):
        lines += block("plots.accuracy", png=f"{figures.name}/accuracy_vs_k.png") + [""]
    for arm in ("star_k4", "arm_k1"):
        picture = study_dir / picture_file(rid, arm)
        if picture.is_file():
            shutil.copy(picture, figures / picture.name)
            lines += block("plots.predictions", key=arm, png=f"{figures.name}/{picture.name}", arm=ARM_NAMES[arm])
            lines += [""]

    loaders = [e for e in ours if e.get("item") == "loader"]
    lines += block("throughput") + [""]
    for e in loaders:
        lines.append(say("throughput.loader", device=e["device"], workers=e["num_workers"],
                         pretrain=e["pretrain_k4_img_s"], finetune=e["finetune_img_s"]))
    for arm in ARMS:
        for item in ("pretrain", "ft100"):
            if table[arm, item]:
                e = table[arm, item][0]
                lines.append(say("throughput.run", arm=ARM_NAMES[arm], seed=e["seed"], img_s=e["img_s"],
                                 wall_s=e["wall_s"],
                                 run=say("throughput.pretrain") if item == "pretrain" else EVAL_NAMES[item]))
    lines.append("")

    lines += reruns(study_dir, results)
    lines += sizing(results, recipe_name)
    devices = sorted({(e["device"], e["torch"], e["commit"]) for e in ours})
    lines += block("how_run") + [""]
    lines += [say("how_run.device", device=d, torch=t, commit=c) for d, t, c in devices] + [""]

    lines += [*block("caveats"), *pretrained_again(table), *cards(table), *shared_machines(ours), commits(ours),
              say("caveats.probe"), ""]
    page = out / "fashion-mnist.md"
    page.write_text("\n".join(lines))
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="h100", choices=sorted(RECIPES))
    parser.add_argument("--study", type=Path, default=HERE, help="folder with results.json, curves/, figures/")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.recipe, args.study, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
