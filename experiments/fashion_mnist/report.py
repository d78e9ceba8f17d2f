"""Build docs/results/fashion-mnist.md and its PNGs from the study's results.json, curves/ and figures/.

    python -m experiments.fashion_mnist.report [--recipe h100] [--out docs/results]

Everything in the page is computed from the recorded results, so it can be rebuilt after every stage; the
verdict says which of the issue's criteria the numbers meet so far, and "not enough seeds" while an arm has
fewer than three.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .recipes import ARMS, EVALS, RECIPES, SEEDS, STAGES, recipe_id  # noqa: E402
from .stats import beyond, log2_slope, margin, mean_std, past_zero, relative_size, trend  # noqa: E402
from .study import HERE, estimate, item_key, load_results, picture_file, unit_items  # noqa: E402

REPO = HERE.parents[1]
EVAL_NAMES = {"linprobe": "linear probe", "ft1": "1% labels", "ft10": "10% labels", "ft100": "full fine-tune"}
ARM_NAMES = {"scratch": "(a) no pretraining", "arm_k1": "(b) ARM, K=1", "star_k4": "(c) STAR, K=4, cluster sep.",
             "k4_nosep": "(d) K=4, no separator", "k4_token": "(e) K=4, one-token sep.",
             "star_k2": "(f) K=2, cluster sep.", "star_k8": "(f) K=8, cluster sep.",
             "star_k16": "(f) K=16, cluster sep."}
K_SWEEP = ("arm_k1", "star_k2", "star_k4", "star_k8", "star_k16")
TARGET_TOP1 = 95.0
ISSUE_BUDGET_MIN = 60  # GPU minutes the issue sizes the whole study to
GPU_COMMAND = """\
OUT=<folder> bash experiments/fashion_mnist/gpu_call.sh <commit>          # on the GPU machine: one shard per GPU
python -m experiments.fashion_mnist.study merge --returned <folder>/fm*.tgz  # here, before the next call
python -m experiments.fashion_mnist.report"""
# Calls at these commits ran on a 2-GPU machine, one job per GPU, before entries recorded their shard.
TWO_AT_ONCE_COMMITS = {"c350d48", "eada05e", "67c1366", "6d8768d"}


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
                lines.append(f"- {ARM_NAMES[arm]}, seed {pretrain['seed']} was pretrained again in a later call (same "
                             "seed and pretraining settings, but a separate run, not a bit-identical encoder): its "
                             f"{', '.join(earlier)} come from the first encoder, the other "
                             "evaluations from the second, and its pretraining time and loss curve"
                             + (" and prediction picture" if pretrain["seed"] == 0 else "") + " are the second run's.")
    return lines


def preliminary(table: dict, arm: str, item: str = "ft100") -> str:
    """"; preliminary: n of 3 seeds" while an arm's evaluation has fewer than 3 seeds, else nothing."""
    n = len(table[arm, item])
    return f"; preliminary: {n} of 3 seeds" if n < 3 else ""


def commits(entries: list) -> str:
    """Caveat line: the code versions the results come from (the recipe id pins settings, not code)."""
    count: dict[str, list[int]] = {}
    for e in entries:
        if e.get("item") in ("pretrain", *EVALS):
            count.setdefault(e["commit"], [0, 0])[("carried_from" in e)] += 1
    listed = ", ".join(f"{c} ({n + m} items" + (f", {m} of them carried over" if m else "") + ")"
                       for c, (n, m) in sorted(count.items(), key=lambda kv: -sum(kv[1])))
    return ("- The recipe id pins the settings, not the code: the items come from commits " + listed + ". The "
            "code changes between them were meant to change speed only (batched scan directions, faster "
            "kernels), each tested equal to the plain PyTorch reference, but they are not bit-identical runs.")


def cards(table: dict) -> list[str]:
    """Caveat line when the pretraining timings of the table come from more than one card."""
    runs = [(arm, e["seed"], e["device"]) for arm in ARMS for e in table[arm, "pretrain"]]
    if len({device for _, _, device in runs}) < 2:
        return []
    per_arm = "; ".join(
        f"{ARM_NAMES[arm]}: " + ", ".join(f"seed {seed} on {device}" for a, seed, device in runs if a == arm)
        for arm in ARMS if any(a == arm for a, _, _ in runs))
    return [f"- The pretraining wall times and images/s average over runs on different cards ({per_arm}); "
            "compare arms by the runs on one card (the Throughput section lists seed 0's)."]


def shared_machines(entries: list) -> list[str]:
    """Caveat line for the items that ran on a machine with several GPUs next to other jobs on the other GPUs,
    with their pretraining speed next to that of the runs that had a machine to themselves on the same card."""
    def gpus(e):  # GPUs of the machine the entry ran on, when it shared one
        return int(e["shard"].split("/")[1]) if "shard" in e else 2 if e.get("commit") in TWO_AT_ONCE_COMMITS else 1
    ours = [e for e in entries if e.get("item") in ("pretrain", *EVALS)]
    shared = [e for e in ours if gpus(e) > 1]
    if not shared:
        return []
    devices = sorted({e["device"] for e in shared})
    line = (f"- {len(shared)} item{'s' if len(shared) != 1 else ''} ran on a machine with "
            f"{'/'.join(str(n) for n in sorted({gpus(e) for e in shared}))} GPUs ({', '.join(devices)}), one run per "
            "GPU, next to other jobs on the other GPUs (other units; at 6d8768d the GPU tests), all sharing the "
            "host's CPU cores; commits " + ", ".join(sorted({e["commit"] for e in shared})) + ".")
    pretrain = [e for e in ours if e["item"] == "pretrain" and e["device"] in devices]
    there = [e["img_s"] for e in pretrain if gpus(e) > 1]
    alone = [e for e in pretrain if gpus(e) == 1]
    if there and alone:
        names = ", ".join(f"{ARM_NAMES[e['arm']]} seed {e['seed']}" for e in alone)
        speeds = [e["img_s"] for e in alone]
        line += (f" Pretraining ran at {min(there):.0f}-{max(there):.0f} images/s there; the runs that had a machine "
                 f"of the same card to themselves ({names}) ran at {min(speeds):.0f}-{max(speeds):.0f}.")
    return [line]


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
    lines = ["## Same seed, run again", "",
             "A GPU call that starts from an older results.json repeats finished units (pretraining included) "
             "with the same seed and settings; `study.py merge` keeps the recorded results and puts the repeats "
             "in `reruns.json`, so they are not counted in the table above. Training on the GPU is not "
             "bit-reproducible (the study does not ask torch for deterministic algorithms); the difference "
             "shows how much that alone moves a result:", "",
             "| arm | seed | evaluation | recorded | rerun | difference | card, commit (recorded / rerun) |",
             "|---|---|---|---|---|---|---|"]
    for first, second in rows:
        lines.append(f"| {ARM_NAMES[first['arm']]} | {first['seed']} | {EVAL_NAMES[first['item']]} | "
                     f"{first['test_top1']:.2f} | {second['test_top1']:.2f} | "
                     f"{second['test_top1'] - first['test_top1']:+.2f} | {first['device']}, {first['commit']} / "
                     f"{second['device']}, {second['commit']} |")
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
        return f"{EVAL_NAMES[item]}: not measured yet"
    diff = statistics.mean(a) - statistics.mean(b)
    line = f"{EVAL_NAMES[item]}: {statistics.mean(a):.2f} vs {statistics.mean(b):.2f}, difference {diff:+.2f} points"
    if min(len(a), len(b)) < 3:
        return line + f"; not enough seeds to judge ({len(a)} and {len(b)}, 3 needed)"
    spread = margin(a, b)[1]
    verdict = "meets" if beyond(diff, spread) else "does not meet"
    if spread == 0:
        return line + f"; both stds are 0; {verdict} the > 2 std criterion"
    return line + f" = {diff / spread:+.1f} x the larger std ({spread:.2f}); {verdict} the > 2 std criterion"


def conclusion(table: dict, full: dict) -> str:
    """The claim's test in one paragraph (it rests on the linear probe and the 1%-label fine-tune of STAR and
    ARM, 3 seeds each), or why it cannot be made yet; then what is still unmeasured."""
    claim_items = ("linprobe", "ft1")
    seeds = {arm: min(len(table[arm, item]) for item in claim_items) for arm in ("star_k4", "arm_k1")}
    short = [f"{ARM_NAMES[a]} has {n}" for a, n in seeds.items() if n < 3]
    if short:
        return ("The claim is not tested yet: it needs the linear probe and the 1%-label fine-tune of 3 seeds of "
                f"STAR (c) and ARM (b), and so far {', '.join(short)}. Nothing here supports or contradicts STAR.")

    def top1(arm, item):
        return [e["test_top1"] for e in table[arm, item]]
    wins = {item: margin(top1("star_k4", item), top1("arm_k1", item)) for item in claim_items}
    if all(beyond(d, s) for d, s in wins.values()):
        claim = "STAR beats ARM by more than 2 std on both the linear probe and the 1%-label fine-tune"
    elif all(d <= 0 for d, _ in wins.values()):
        claim = "STAR does not beat ARM: it is not ahead on the linear probe or the 1%-label fine-tune"
        behind = [EVAL_NAMES[i] for i, (d, s) in wins.items() if beyond(-d, s)]
        if behind:
            claim += f"; ARM is ahead by more than 2 std on the {' and the '.join(behind)}"
    else:
        claim = ("STAR's lead over ARM is not clear: the > 2 std margin is not reached on both the linear probe "
                 "and the 1%-label fine-tune")
    text = (f"At this scale and recipe, {claim} (" + "; ".join(f"{EVAL_NAMES[i]} {d:+.2f} points, std {s:.2f}"
            for i, (d, s) in wins.items()) + ").")
    if full:
        best = max(full, key=full.get)
        target = "reaching" if full[best] >= TARGET_TOP1 else "short of"
        text += (f" The best full fine-tune is {full[best]:.2f}% ({ARM_NAMES[best]}{preliminary(table, best)}), "
                 f"{target} the {TARGET_TOP1}% target.")
    fits = {item: k_slope(table, item) for item in claim_items}
    if all(fits.values()):
        falls = all(trend(slope, se) < 0 for slope, se, _ in fits.values())
        text += (" In the K sweep, " + ("both fall" if falls else "they do not both fall by more than 2 standard "
                 "errors") + " as more images share a sequence (" + "; ".join(
                 f"{EVAL_NAMES[i]} {slope:+.2f} ± {se:.2f} points per doubling of K" for i, (slope, se, _) in
                 fits.items()) + "; see Ablations" + ("" if complete_k_sweep(table, claim_items) else
                                                   "; preliminary: not every K has 3 seeds yet") + ").")
    pending = [f"{EVAL_NAMES[item]} of {ARM_NAMES[arm]} ({len(table[arm, item])} of 3 seeds)"
               for arm in ("star_k4", "arm_k1", "scratch") for item in EVALS if len(table[arm, item]) < 3]
    if pending:
        text += " Still to measure before the other evaluations can be judged: " + "; ".join(pending) + "."
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
        return f"{EVAL_NAMES[item]}: fewer than 3 values of K measured"
    slope, se, runs = fit
    measured = [arm for arm in K_SWEEP if table[arm, item]]
    means = ", ".join(f"K={ARMS[a]['num_images']} {statistics.mean(e['test_top1'] for e in table[a, item]):.2f}"
                      for a in measured)
    called = {-1: "falls with K", 1: "rises with K",
              0: "shows no trend in K beyond 2 standard errors"}[trend(slope, se)]
    fewest = min(len(table[a, item]) for a in measured)
    note = "" if complete_k_sweep(table, [item]) else \
        f" (preliminary: {len(measured)} of {len(K_SWEEP)} values of K, at least {fewest} seeds each)"
    return (f"{EVAL_NAMES[item]}: {means}; {slope:+.2f} ± {se:.2f} points per doubling of K (slope ± standard "
            f"error over {runs} runs): it {called}{note}")


def ablations(table: dict, context_measured: bool = False) -> list[str]:
    """Verdict lines of the ablations: does the cluster separator matter at K=4 ((c) vs (d) and (e)), and how
    each evaluation moves with the number of images per sequence ((b) and the K sweep (f))."""
    lines = ["## Ablations", "", "Does the separator matter at K=4? The cluster separator (c) against no separator "
             "(d) and a one-token separator (e):", ""]
    for other in ("k4_nosep", "k4_token"):
        for item in ("linprobe", "ft1"):
            lines.append(f"- (c) vs {ARM_NAMES[other]}, {compare(table, 'star_k4', other, item)}.")
    lines += ["", "How each evaluation moves with K, the images per sequence (K=1 is ARM, without separator; K >= 2 "
              "with cluster separators):", ""]
    lines += [f"- {k_trend(table, item)}." for item in EVALS]
    lines += ["", "Reading them (facts, then two explanations):", "",
              "- Sequence length: an image here is 64 tokens, 68 with a cluster separator, so K = 2, 4, 8 and 16 "
              "make sequences of 136, 272, 544 and 1088 tokens. The paper reports accuracy dropping past about "
              "640 tokens; here it falls from K=2 on, far below that length.",
              "- Size of the effect sought: the paper's STAR-B leads ARM-B by 0.3 points on ImageNet (83.5 vs "
              "83.2%) after 1600 pretraining epochs; this study pretrains for 4. A lead of that size on the full "
              "fine-tune would be hidden by the spread here (std 0.1-0.2 over seeds; up to 0.5 between two runs of "
              "one seed, see below).",
              "- Explanations: the images packed into a sequence are unrelated draws, so what the state carries from "
              "earlier images does not help predict the next one, and the encoder has to learn to discount it; "
              "and the classifier reads each image from a fresh state, while in pretraining all but 1/K of the "
              "images follow others, a mismatch that grows with K. `context.py` measures both: "
              + ("see the next section." if context_measured else "it has not run yet.")]
    return lines + [""]


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
    cards = sorted({f"{e['device']} at {e['commit']}" for e in entries})
    lines = ["## Why does accuracy fall with K? (context.py)", "",
             "`python -m experiments.fashion_mnist.context --seeds 0 1 2`: one more pretraining of each arm and "
             "seed below (the study's recipe; the study keeps no weights), then two measurements on the test "
             "images. Next-cluster loss (MSE, normalized pixels; clusters 2-16 only, so arms with and without "
             "separators compare) of the image at position 1 of sequences of K images, read from a fresh state as "
             "under ARM, and how much higher the positions after it are. Causal linear probe (test top-1 %): the "
             "last encoder level, LayerNormed as the decoder reads it, averaged over an image's tokens; a "
             "logistic regression fitted on the 55k training part; each image read alone (as fine-tuning reads "
             "it) and after m random other images. Mean ± std over seeds; the study's linear probe (the 4-direction "
             f"classifier) beside it. On {', '.join(cards)}. Raw results: "
             "`experiments/fashion_mnist/context.json`.", "",
             "| arm | loss, position 1 | positions 2..K minus position 1 | probe, alone | probe after m others "
             "minus alone | the study's linear probe |", "|---|---|---|---|---|---|"]
    for arm in by_arm:
        moved = "; ".join(f"m={m}: {fmt(after[arm, m])}" for m in prefixes if (arm, m) in after) or "-"
        lines.append(f"| {ARM_NAMES[arm]} | {fmt(first[arm], 4)} | {fmt(later.get(arm, []), 4)} | "
                     f"{fmt(alone[arm])} | {moved} | {fmt([e['test_top1'] for e in table[arm, 'linprobe']])} |")
    lines += ["", "What they say:", ""]

    few = [ARM_NAMES[arm] for arm, found in by_arm.items() if len(found) < len(SEEDS)]
    if few:  # a verdict of "no effect" needs a spread to be judged against
        lines.append(f"- Not judged: fewer than {len(SEEDS)} seeds of {', '.join(few)}.")
        return lines + [""]
    sweep = [arm for arm in K_SWEEP if arm in by_arm]
    fit = log2_slope([(ARMS[arm]["num_images"], v) for arm in sweep for v in first[arm]])
    rises = fit is not None and beyond(fit[0], fit[1])
    if fit is not None:
        lines.append("- First image, fresh state: loss " + ", ".join(
            f"K={ARMS[a]['num_images']} {statistics.mean(first[a]):.4f}" for a in sweep)
            + f"; {fit[0]:+.4f} ± {fit[1]:.4f} per doubling of K over {fit[2]} runs. "
            + ("An encoder pretrained with more images per sequence predicts worse even where nothing comes "
               "before." if rises else "No rise with K beyond 2 standard errors."))
    hurt = [arm for arm, diffs in later.items() if past_zero(diffs, +1)]
    if later:
        means = [statistics.mean(d) for d in later.values()]
        lines.append(f"- Later images against the first: {min(means):+.4f} to {max(means):+.4f} (arm means). "
                     + (f"Worse by more than 2 std for {', '.join(ARM_NAMES[a] for a in hurt)}: earlier images "
                        "get in the way." if hurt else "No arm predicts later images worse than its first by more "
                        "than 2 std: the unrelated images before an image do not get in the way of predicting it."))
    helped = [arm for arm, diffs in own_context.items() if past_zero(diffs, +1)]
    if own_context:
        means = [statistics.mean(d) for d in own_context.values()]
        lines.append(f"- Reading an image after K-1 others (its pretraining context) instead of alone moves the "
                     f"causal probe by {min(means):+.2f} to {max(means):+.2f} points (arm means, K > 1). "
                     + (f"Better in that context by more than 2 std for {', '.join(ARM_NAMES[a] for a in helped)}: "
                        "fine-tuning from a fresh state reads the encoder outside the context it was trained in."
                        if helped else "No arm's features are better in that context by more than 2 std, so the "
                        "fresh state fine-tuning reads images from costs nothing measurable."))
    causal = log2_slope([(ARMS[arm]["num_images"], v) for arm in sweep for v in alone[arm]])
    study = k_slope(table, "linprobe")
    if causal is not None and study is not None:
        size = {"opposite": "The two probes disagree on the direction of the K trend.",
                "smaller": "The features are much closer across K than the study's probe makes them look. The two "
                           "probes differ in what they read (causal features alone vs the 4-direction classifier) "
                           "and in the fit (full-batch L-BFGS, 200 iterations, vs 3 SGD epochs); which of the two "
                           "makes the gap is not separated here.",
                "larger": "The causal probe sees a K trend more than twice the study's probe's.",
                "similar": "The two probes see a K trend of about the same size (within a factor of 2)."
                }[relative_size(causal[0], study[0])]
        lines.append(f"- The causal probe moves by {causal[0]:+.2f} ± {causal[1]:.2f} points per doubling of K, the "
                     f"study's linear probe by {study[0]:+.2f} ± {study[1]:.2f}. {size}")
    if {"star_k4", "arm_k1"} <= set(alone):
        star, arm = alone["star_k4"], alone["arm_k1"]
        gap, spread = margin(star, arm)
        line = (f"- STAR (c) vs ARM (b) on the causal probe: {statistics.mean(star):.2f} vs "
                f"{statistics.mean(arm):.2f}, {gap:+.2f} points = {gap / spread:+.1f} x the larger std "
                f"({spread:.2f})")
        study_star, study_arm = ([e["test_top1"] for e in table[a, "linprobe"]] for a in ("star_k4", "arm_k1"))
        if study_star and study_arm:
            study_gap = statistics.mean(study_star) - statistics.mean(study_arm)
            line += f"; the study's linear probe ranks them {'the same' if gap * study_gap > 0 else 'the other'} way"
        lines.append(line + ".")
    if rises and later and not hurt and own_context and not helped:
        lines.append("- So neither explanation accounts for the fall. What falls with K is how well the encoder "
                     "predicts at all, the first image included, at the same images seen and optimizer steps; why "
                     "longer sequences train a worse predictor at this budget is not measured here.")
    return lines + [""]


def tuning(study_dir: Path, table: dict) -> list[str]:
    """The holdout runs that chose the full fine-tuning recipe (tune.py), if recorded, and what the chosen
    recipe then reached on the test split."""
    runs = load_results(study_dir / "tune.json")
    if not runs:
        return []
    lines = ["## How the full fine-tune was chosen", "",
             "`python -m experiments.fashion_mnist.tune`: one STAR K=4 encoder (a separate seed-0 pretraining with "
             "the recipe above), fine-tuned on the 55k training part with each setting; top-1 on the 5k holdout "
             "(never the test split). Raw results: `experiments/fashion_mnist/tune.json`.", "",
             "| epochs | batch | blr | layer decay | holdout top-1 | images/s | wall (s) | card, commit, recipe |",
             "|---|---|---|---|---|---|---|---|"]
    for key, e in sorted(runs.items(), key=lambda kv: (kv[1]["optim"]["epochs"], -kv[1]["val_top1"])):
        o = e["optim"]
        lines.append(f"| {o['epochs']} | {o['batch_size']} | {o['blr']} | {o.get('layer_decay', '-')} | "
                     f"{e['val_top1']:.2f} | {e['img_s']:.0f} | {e['wall_s']:.0f} | {e['device']}, {e['commit']}, "
                     f"{key.split('/')[0]} |")
    lines += ["", "The earlier full fine-tune (3 epochs, batch 256, blr 5e-4) reached 84-85% on the test split. Of "
              "the three (learning rate, layer decay) settings the lowest did best, and doubling its epochs added "
              "about 2 points: the fine-tune is not converged at 12 epochs either, and longer fine-tuning is the "
              "most promising lever measured so far."]
    full = [e["test_top1"] for arm in ARMS for e in table[arm, "ft100"]]
    if full:
        lines[-1] += (f" With the chosen recipe, the {len(full)} full fine-tunes on the test split so far reached "
                      f"{min(full):.2f}-{max(full):.2f}%, every arm short of {TARGET_TOP1}%.")
    return lines + [""]


def plot_losses(curves: Path, batch_size: int, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for arm in ARMS:
        files = sorted(curves.glob(f"{arm}_s*.csv"))
        for i, f in enumerate(files):
            with open(f, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
            x = [int(r["step"]) * batch_size / 1e3 for r in rows]
            ax.plot(x, [float(r["train/loss"]) for r in rows], color=f"C{list(ARMS).index(arm)}", lw=1,
                    alpha=0.9 if i == 0 else 0.35, label=ARM_NAMES[arm] if i == 0 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set(xlabel="images seen (thousands)", ylabel="training loss (MSE, normalized pixels)",
           title="Pretraining loss per arm (all seeds; faint = seeds > 0)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_k(table: dict, path: Path) -> bool:
    fig, axes = plt.subplots(1, len(EVALS), figsize=(13, 3.4))
    drawn = False
    for ax, item in zip(axes, EVALS):
        points = [(ARMS[arm]["num_images"], [e["test_top1"] for e in table[arm, item]]) for arm in K_SWEEP]
        points = [(k, v) for k, v in points if v]
        if points:
            drawn = True
            ks = [k for k, _ in points]
            stats = [mean_std(v) for _, v in points]
            ax.errorbar(ks, [m for m, _ in stats], yerr=[0 if s != s else s for _, s in stats], marker="o",
                        capsize=3)
        scratch = [e["test_top1"] for e in table["scratch", item]]
        if scratch:
            ax.axhline(statistics.mean(scratch), color="gray", ls="--", lw=1, label="no pretraining")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], ["1\n(ARM)", "2", "4", "8", "16"])
        ax.set(title=EVAL_NAMES[item], xlabel="images per sequence K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


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
        per_stage.append(f"stage {stage} ~{stage_s / 60:.0f} min")
    total_min = (done_s + todo_s) / 60
    over = (f"{total_min / ISSUE_BUDGET_MIN:.1f}x the issue's budget of about {ISSUE_BUDGET_MIN} min"
            if total_min > ISSUE_BUDGET_MIN else f"within the issue's budget of about {ISSUE_BUDGET_MIN} min")
    return ["## Budget", "",
            f"- GPU time of the whole study at this recipe: ~{total_min:.0f} min, {over} "
            f"({done_s / 60:.1f} min in the recorded items, ~{todo_s / 60:.0f} min to go; " + ", ".join(per_stage)
            + "). Not counted: machine start-up, encoders pretrained again after a call lost their weights (only "
            "the last pretraining of a unit is recorded), the repeats in reruns.json, the tuning runs, and runs of "
            "earlier recipe ids; the "
            "carried-over items count with the time older code took. Unmeasured items are estimated from "
            "measured ones of the same kind (per epoch; pretraining per K) and, before any, from the recipe's "
            "guesses, which undershoot. Calls on a machine with 2 GPUs run two units at once, one per GPU, so "
            "the device time they take is about half the GPU time of their items.",
            "- Why it runs over: at this model size most of a training step is fixed host-side cost, ~100 ms per "
            "step whatever the batch (launching ~1,500 kernels; docs/benchmarks/README.md). Capturing the step as "
            "CUDA graphs (`--compile --compile_mode reduce-overhead`) made the study's step 2.3-2.7x faster at 128 "
            "images and 1.4x at 1024 on an H200, but each run would pay its compile time, and the study keeps "
            "every arm on the code path its first results were measured with, eager.", ""]


def build(recipe_name: str, study_dir: Path, out: Path) -> Path:
    results, rid = load_results(study_dir / "results.json"), recipe_id(recipe_name)
    recipe = RECIPES[recipe_name]
    table = collect(results, rid)
    figures = out / "fashion-mnist"
    figures.mkdir(parents=True, exist_ok=True)
    ours = [e for k, e in results.items() if k.startswith(rid + "/")]
    done = sum(item_key(rid, a, s, i) in results for st in STAGES.values() for a, s in st for i in unit_items(a))
    total = sum(len(unit_items(a)) for st in STAGES.values() for a, _ in st)

    lines = ["# Fashion-MNIST: does packing images with separators (STAR) beat one image per sequence (ARM)?", "",
             "Generated by `python -m experiments.fashion_mnist.report` from `experiments/fashion_mnist/results.json`;"
             " do not edit by hand.", "",
             f"**Status: {done} of {total} work items done** (recipe `{rid}`). "
             + ("The study is complete." if done == total else
                "Arms with fewer than 3 seeds are preliminary; the verdict below says so where it applies."), ""]

    pre, ev = recipe["pretrain"], recipe["evals"]
    model = recipe["model"]
    lines += ["## Setup", "",
              f"- Data: Fashion-MNIST, 28 px upscaled to 32 px. Pretraining uses all 60k training images without "
              f"labels. Classifiers train on 55k of them; {recipe['val_size']} are held out (per seed) for "
              "choices; every number below is top-1 on the 10k test images, measured once at the end.",
              f"- Model: star_tiny (width 192, 12 Mamba blocks, d_state 16), patch 4 -> 8x8 grid, clusters of 2x2 "
              f"patches -> 16 clusters of 4 tokens per image; decoder {model.get('decoder_dim', 512)} wide, 4 "
              "cross-attention blocks. Classifier: the 4-direction Vision Mamba, initialised from the pretrained "
              "forward direction.",
              f"- Pretraining (every arm the same): {pre['epochs']} epochs, batch {pre['batch_size']} images "
              f"(= {pre['batch_size']}/K sequences), AdamW, blr {pre['blr']} (lr = blr x batch / 256), "
              f"{pre['warmup_epochs']} warm-up epoch, cosine; RandomResizedCrop(scale 0.6-1) + flip.",
              "- Evaluation of each encoder (test top-1 %): "
              + "; ".join(f"{EVAL_NAMES[k]} {v['epochs']} epochs, batch {v['batch_size']}, blr {v['blr']}"
                          for k, v in ev.items())
              + ". Fine-tuning: RandAugment m5, RandomResizedCrop(scale 0.6-1) + flip, label smoothing 0.1, drop "
                "path 0.1, layer decay 0.75 (the fmnist-tiny preset).",
              f"- (a) no pretraining trains the classifier from random weights with the same recipe plus "
              f"{pre['epochs']} extra epochs (the pretraining's epochs; for the full fine-tune that matches the "
              "images seen, for the label fractions it is the same epoch count, not the same images, since "
              "hundreds of epochs on 550 images would measure over-fitting). Its 'linear probe' is of a random "
              "encoder: what random features are worth.", ""]

    lines += ["## Results", "", "Test top-1 (%), mean ± std over seeds (n = seeds done). Pretraining time and "
              "images/s: mean over the same runs, on the cards named below.", "",
              "| arm | " + " | ".join(EVAL_NAMES[e] for e in EVALS) + " | pretrain wall (s) | pretrain img/s |",
              "|---|" + "---|" * (len(EVALS) + 2)]
    for arm in ARMS:
        cells = [fmt([e["test_top1"] for e in table[arm, item]]) for item in EVALS]
        cells += [fmt([e[key] for e in table[arm, "pretrain"]], 0) for key in ("wall_s", "img_s")]
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cells) + " |")
    lines.append("")

    full = {arm: statistics.mean([e["test_top1"] for e in table[arm, "ft100"]]) for arm in ARMS if table[arm, "ft100"]}
    lines += ["## Verdict" if done == total else "## Verdict so far", ""]
    if full:
        best = max(full, key=full.get)
        met = "meets" if full[best] >= TARGET_TOP1 else "does not meet"
        lines.append(f"- Best full fine-tune: {ARM_NAMES[best]} at {full[best]:.2f}% ({met} the {TARGET_TOP1}% "
                     f"target{preliminary(table, best)}).")
        if best == "scratch":
            lines[-1] += (f" (a) fine-tunes {pre['epochs']} epochs longer than the pretrained arms (the compute "
                          "match), and the tuning runs below show the fine-tune is not converged, so its lead may "
                          "be those epochs rather than the absence of pretraining.")
    for item in ("linprobe", "ft1", "ft10", "ft100"):
        lines.append(f"- STAR (c) vs ARM (b), {compare(table, 'star_k4', 'arm_k1', item)}.")
    for item in ("ft1", "ft100"):
        lines.append(f"- ARM (b) vs no pretraining (a), {compare(table, 'arm_k1', 'scratch', item)}.")
    lines.append("")

    lines += ["## Conclusion", "", conclusion(table, full), ""]
    measured = context(study_dir, rid, table)
    lines += ablations(table, bool(measured)) + measured
    lines += tuning(study_dir, table)
    lines += ["## Plots", ""]
    batch = pre["batch_size"]
    if plot_losses(study_dir / "curves" / rid, batch, figures / "pretrain_loss.png"):
        lines += ["![pretraining loss](fashion-mnist/pretrain_loss.png)", "",
                  "Losses of arms with and without separators are not strictly comparable: with a separator the "
                  "first cluster of every image is a target too (predicted from the separator alone).", ""]
    if plot_accuracy_vs_k(table, figures / "accuracy_vs_k.png"):
        lines += ["![accuracy vs K](fashion-mnist/accuracy_vs_k.png)", "",
                  "K=1 is ARM (no separator); K >= 2 use cluster separators. Dashed: no pretraining.", ""]
    for arm in ("star_k4", "arm_k1"):
        picture = study_dir / picture_file(rid, arm)
        if picture.is_file():
            shutil.copy(picture, figures / picture.name)
            lines += [f"![{arm} predictions](fashion-mnist/{picture.name})", "",
                      f"{ARM_NAMES[arm]}, seed 0: test images (left of each pair) and the model's next-cluster "
                      "predictions (each cluster predicted from everything before it; patch mean/std taken from "
                      "the real patch, as MAE draws its reconstructions; black = never predicted).", ""]

    loaders = [e for e in ours if e.get("item") == "loader"]
    lines += ["## Throughput", ""]
    for e in loaders:
        lines.append(f"- Data loaders alone on {e['device']} ({e['num_workers']} workers, PIL transforms): "
                     f"pretraining {e['pretrain_k4_img_s']:.0f} images/s, fine-tuning with RandAugment "
                     f"{e['finetune_img_s']:.0f} images/s.")
    for arm in ARMS:
        for item in ("pretrain", "ft100"):
            if table[arm, item]:
                e = table[arm, item][0]
                lines.append(f"- {ARM_NAMES[arm]}, {'pretraining' if item == 'pretrain' else 'full fine-tune'}, "
                             f"seed {e['seed']}: {e['img_s']:.0f} images/s, {e['wall_s']:.0f} s wall.")
    lines.append("")

    lines += reruns(study_dir, results)
    lines += sizing(results, recipe_name)
    devices = sorted({(e["device"], e["torch"], e["commit"]) for e in ours})
    lines += ["## How this was run", "",
              "The study runs in GPU calls of at most 10 minutes. Each call runs one shard per GPU; a shard takes "
              "every N-th unfinished arm x seed and does the items that fit its budget (a pretrained arm x seed "
              "needs its whole unit to fit, since its weights do not outlive the call), appending them to its "
              "results.json as they finish. The results come home and are merged before the next call, which must "
              "start from them (a rerun skips what is done). The GPU machine needs the repo, with `.fmnist` holding "
              "the four Fashion-MNIST .gz files, and timm (in the machine's image; else carry its wheel and add it "
              "to PYTHONPATH):",
              "", "```", GPU_COMMAND, "```", "",
              "On a CPU the same pipeline runs in seconds with `--recipe smoke` (synthetic images) or "
              "`--recipe smoke-fmnist`.", ""]
    lines += [f"- Measured on: {d} (torch {t}, commit {c})" for d, t, c in devices] + [""]

    lines += ["## Caveats", "",
              "- One small recipe, not tuned per arm (no budget for it): the pretraining and the linear probe, 1% and "
              "10% recipes were fixed before any result; the full fine-tune was chosen on the holdout with a STAR "
              "encoder (seed 0), which if anything favours STAR. Other learning rates or longer schedules could "
              "rank the arms differently.",
              "- Some results were carried over from the previous recipe id (the items whose settings did not "
              "change when the full fine-tune was retuned; each such entry names its source in `carried_from`). "
              "They were measured at commit c358741, before the mixer ran its four directions as one batch "
              "(b8b641e): the same computation (tested equal in float64), only slower.",
              *pretrained_again(table),
              *cards(table),
              *shared_machines(ours),
              commits(ours),
              "- The linear probe reads the 4-direction classifier whose backward and column scans are copies of "
              "the causal forward direction: it probes that transfer, not the causal features alone (context.py's "
              "causal probe does; see \"Why does accuracy fall with K?\").",
              ""]
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
