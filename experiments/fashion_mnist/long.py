"""Does STAR beat ARM once pretraining is long enough? Fashion-MNIST at 25 / 50 / 100 pretraining epochs.

The long study (recipes.LONG_*), on the machinery of study.py, in resumable units:

    python -m experiments.fashion_mnist.long run --budget-min 9.2   # the next work that fits in 9.2 minutes
    python -m experiments.fashion_mnist.long run --only finetunes  # only the fine-tune stage (or: units)
    python -m experiments.fashion_mnist.long run --rebuild         # pretrain again where a needed encoder is lost
    python -m experiments.fashion_mnist.long status                # done / to do
    python -m experiments.fashion_mnist.long merge --returned DIR  # bring a GPU call's results and encoders home
    python -m experiments.fashion_mnist.long stage                 # long/carry: the encoders the next call needs
    python -m experiments.fashion_mnist.long epoch-starts --curve CSV --batch-size 2048  # where a run's time went

(from the repo root, with star importable: installed, or PYTHONPATH=src). One GPU call:

    OUT=<folder> bash experiments/fashion_mnist/long_call.sh <commit>

A pretraining unit is one arm x seed: one 100-epoch pretraining that keeps its model at epochs 25, 50 and 100
(`--snapshot_every`), then at each snapshot a linear probe and the 1%-label fine-tune (the 4-epoch study's
evaluation recipes), each measured once on the test split and recorded as it ends. The earlier snapshots are
evaluated beside the pretraining, which must fit one call with them, since those snapshots do not outlive
it. The last one's encoder (pretraining weights without the decoder, fp32, in parts under 16 MiB for the
device's file limit) comes home to encoders/: its evaluations run in the same call if they fit, else in a
later one that carries it (`stage` copies what the next call needs into carry/, which the call names).
encoders/ is not committed (20 MB an encoder), so it does not outlive the machine it is on; where a needed one
is lost, `run --rebuild` pretrains its unit again and takes the encoder only if the loss curve repeats the
recorded one at every logged step within REBUILD_RTOL (on another machine or at another commit the run is not
repeated bit for bit); what is measured from such an encoder names it (`encoder: rebuild<N>`).

The full fine-tune (recipes.LONG_FT_RECIPES) fills the time the claim's units leave; the single-seed units,
the issue's first cut, run after it. For no pretraining, ARM and STAR alike, the settings are chosen on the
holdout from seed 0's 100-epoch encoder (`next_finetunes`: an epochs ladder, then lr, layer decay and
augmentation variants), then the choice runs on every seed and is measured once on the test split. Results
go to long/results.json under keys that name the recipe, as in study.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from star.models import StarPretrain
from star.models.hub import CONFIG_NAME, RUN_CONFIG_FILE, WEIGHTS_NAME, snapshot_dir
from star.training.provenance import environment

from . import study
from .recipes import (LONG_ARMS, LONG_FT_ARMS, LONG_FT_RECIPES, LONG_LAST_UNITS, LONG_RECIPES, LONG_SNAPSHOT_EVALS,
                      LONG_UNITS, SEEDS, ft_recipe_id, recipe_id)

HERE = Path(__file__).resolve().parent / "long"
REPO = Path(__file__).resolve().parents[2]
PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
DECODER = ("decoder", "feature_")  # names of the pretraining-only weights: the decoder and its feature projection
REBUILD = "rebuild"  # the items of a unit pretrained again for its lost encoder: rebuild0, rebuild1, ...
# How far a rebuild's loss may lie from the recorded one, relative, at every logged step and at the end. The first
# rebuild (arm_k1 seed 0, another H100 and commit) drifted 3e-5 by its final loss; the seeds of one arm's 4-epoch
# units differ by about 1e-2. The first difference beyond it refuses the encoder.
REBUILD_RTOL = 1e-3
SOURCE_FILE = "encoder_source.txt"  # in a model folder: which run made the encoder ("pretrain" where absent)


def unit_snapshot(runs: Path, arm: str, seed: int, epoch: int) -> Path:
    """A unit's pretraining snapshot of `epoch` under the runs folder."""
    return snapshot_dir(runs / arm / f"s{seed}" / "pretrain", epoch)


def snapshot_items(recipe: dict) -> list[str]:
    """The evaluations of one unit, by snapshot: linprobe_e25, ft1_e25, ..."""
    return [f"{item}_e{epoch}" for epoch in recipe["snapshots"] for item in LONG_SNAPSHOT_EVALS]


def estimate(results: dict, rid: str, recipe: dict, item: str, arm: str) -> float:
    """Seconds an item should take: its slowest measured time in this recipe (pretraining: of the same K;
    a K not measured yet is taken at the slowest other: the 4-epoch study's K = 1, 4 and 16 ran at about the
    same images/s), else the recipe's guess; with study.py's 1.1x margin and 20 s for start-up and packing."""
    mine = [e for k, e in results.items() if k.startswith(rid + "/") and "wall_s" in e]

    def kind_of(item):  # a rebuild is a pretraining run again
        return "pretrain" if item.startswith(REBUILD) else item.split("_e")[0]

    def slowest(kind, same=lambda e: True):
        return max((e["wall_s"] for e in mine if kind_of(e.get("item", "")) == kind and same(e)), default=None)

    if item == "pretrain":
        seconds = slowest("pretrain", lambda e: e.get("num_images") == LONG_ARMS[arm]["num_images"])
        if seconds is None:
            seconds = slowest("pretrain")
    else:
        seconds = slowest(item.split("_e")[0])
    return 1.1 * (seconds or recipe["estimate_s"][item.split("_e")[0]]) + 20


def encoder_stem(rid: str, arm: str, seed: int) -> str:
    """A unit's encoder files' name: the recipe's id in it, so that no encoder of another recipe is taken."""
    return f"enc-{rid}-{arm}-s{seed}"


def encoder_source(model_dir: Path) -> str:
    """Which run made the model folder's encoder: "pretrain" (the unit's own) or a rebuild's item, rebuild<N>."""
    marker = Path(model_dir) / SOURCE_FILE
    return marker.read_text().strip() if marker.is_file() else "pretrain"


def pack_encoder(model_dir: Path, dest: Path, stem: str) -> list[Path]:
    """The pretraining model's encoder (every weight but the decoder's and its feature projection, fp32) as
    dest/<stem>.partN.safetensors files under PART_BYTES each, plus <stem>.json (the model's config, and under
    "encoder_source" the run that made it)."""
    weights = load_file(str(Path(model_dir) / WEIGHTS_NAME))
    encoder = {k: v for k, v in weights.items() if not k.startswith(DECODER)}
    dest.mkdir(parents=True, exist_ok=True)
    parts, part, size = [], {}, 0
    for key in sorted(encoder):
        nbytes = encoder[key].numel() * encoder[key].element_size()
        if part and size + nbytes > PART_BYTES:
            parts.append(part)
            part, size = {}, 0
        part[key], size = encoder[key], size + nbytes
    parts.append(part)
    files = [dest / f"{stem}.part{i}.safetensors" for i in range(len(parts))]
    for tensors, path in zip(parts, files):
        save_file(tensors, str(path))
    config = json.loads((Path(model_dir) / CONFIG_NAME).read_text())
    (dest / f"{stem}.json").write_text(json.dumps({**config, "encoder_source": encoder_source(model_dir)}, indent=2))
    return [*files, dest / f"{stem}.json"]


def unpack_encoder(src: Path, stem: str, model_dir: Path) -> Path:
    """A model folder that --pretrained reads, from pack_encoder's files: the encoder's weights, and a decoder
    at its initial values (a classifier drops it). Refuses parts that miss an encoder weight."""
    files = sorted(src.glob(f"{stem}.part*.safetensors"))
    if not files or not (src / f"{stem}.json").is_file():
        raise FileNotFoundError(f"no {stem}.json and .part*.safetensors in {src}: that encoder was not brought home")
    config = json.loads((src / f"{stem}.json").read_text())
    encoder = {k: v for f in files for k, v in load_file(str(f)).items()}
    config.pop("architecture")
    source = config.pop("encoder_source", "pretrain")
    model = StarPretrain(**config)
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    lost = [k for k in missing if not k.startswith(DECODER)]
    if lost or unexpected:
        raise ValueError(f"{src}/{stem}: encoder weights missing {lost[:5]}, unexpected {list(unexpected)[:5]}")
    model_dir = model.save_pretrained(model_dir)
    (Path(model_dir) / SOURCE_FILE).write_text(source)
    return model_dir


def evaluate_snapshot(recipe_name: str, arm: str, seed: int, runs: Path, epoch: int, record,
                      evals=LONG_SNAPSHOT_EVALS) -> None:
    """Evaluations `evals` of one snapshot of a unit's pretraining (runs/<arm>/s<seed>/pretrain/model_epochNNNN),
    each handed to `record(item, entry)` as soon as it ends (in the run's process it is recorded at once, so a
    call cut off keeps the ones done; eval-snapshot writes its entries when all are done)."""
    recipe = LONG_RECIPES[recipe_name]
    snapshot = unit_snapshot(runs, arm, seed, epoch)
    for item in evals:
        print(f"[long] {arm} seed {seed}: {item} of the epoch-{epoch} encoder", flush=True)
        run_dir = study._fresh(runs / arm / f"s{seed}" / f"{item}_e{epoch}")
        record(f"{item}_e{epoch}", {**study.evaluate_encoder(recipe, item, seed, run_dir, snapshot),
                                    "snapshot_epoch": epoch})


class SnapshotEvaluator(threading.Thread):
    """Evaluates the earlier snapshots while the pretraining goes on: the evaluations are small and bound by
    the host, so beside the pretraining they take little GPU, and a unit then fits one call. Each snapshot
    runs in a process of its own (`long.py eval-snapshot`): in the pretraining's process it would reseed its
    RNG and launch kernels into its CUDA graphs. `entries` collects item -> entry; `failed` what went wrong."""

    def __init__(self, recipe_name: str, arm: str, seed: int, runs: Path, epochs):
        super().__init__(daemon=True)
        self.args, self.epochs, self.stop = (recipe_name, arm, seed, runs), epochs, threading.Event()
        self.entries, self.failed, self.child = {}, [], None

    def run(self) -> None:
        recipe_name, arm, seed, runs = self.args
        for epoch in self.epochs:
            ready = unit_snapshot(runs, arm, seed, epoch) / RUN_CONFIG_FILE
            while not ready.is_file():  # written last, after the weights
                if self.stop.wait(2.0) and not ready.is_file():
                    self.failed.append(f"epoch {epoch}: the pretraining ended without this snapshot")
                    return
            out = runs / arm / f"s{seed}" / f"entries_e{epoch}.json"
            self.child = subprocess.Popen(  # from the repo root, where `-m experiments...` is found
                [sys.executable, "-m", "experiments.fashion_mnist.long", "eval-snapshot", "--recipe", recipe_name,
                 "--arm", arm, "--seed", str(seed), "--epoch", str(epoch), "--runs", str(runs), "--entries", str(out)],
                cwd=REPO)
            if self.child.wait() != 0 or not out.is_file():
                self.failed.append(f"epoch {epoch}: eval-snapshot exited {self.child.returncode}")
                return
            self.entries.update(json.loads(out.read_text()))

    def cancel(self) -> None:
        """Stop waiting, and end the evaluation running now (the pretraining failed)."""
        self.stop.set()
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()


def _recorder(out: Path, rid: str, arm: str, seed: int):
    """record(item, entry): the entry, with its unit and machine, into out/results.json at once."""
    env = environment()

    def record(item, entry):
        entry.update(arm=arm, seed=seed, item=item, recipe=rid, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **env)
        study.save_result(out / "results.json", study.item_key(rid, arm, seed, item), entry)
        shown = {k: round(v, 3) for k, v in entry.items() if k in ("test_top1", "wall_s", "img_s", "final_loss")}
        print(f"[long] done {arm} seed {seed} {item}: {shown}", flush=True)
    return record


def pretrain_unit(recipe_name: str, arm: str, seed: int, out: Path, runs: Path) -> None:
    """Pretrain one unit, evaluating the earlier snapshots beside it; record them, pack the last encoder
    (its evaluations are `evaluate_last`'s)."""
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    record = _recorder(out, rid, arm, seed)
    *earlier, last = recipe["snapshots"]
    study._fresh(runs / arm / f"s{seed}")  # no snapshot of a run cut off before is taken for this one's
    beside = SnapshotEvaluator(recipe_name, arm, seed, runs, earlier)
    beside.start()
    print(f"[long] {arm} seed {seed}: pretrain", flush=True)
    try:
        pretrain = study.do_pretrain(recipe, arm, seed, runs, out, rid, arms=LONG_ARMS)
    except BaseException:
        beside.cancel()
        raise
    beside.stop.set()  # the last snapshot is written: wait for nothing more
    beside.join()
    # what finished is kept even if an evaluation beside failed (that one is redone with the unit)
    record("pretrain", {**pretrain, "snapshots_evaluated_beside": earlier})
    for item, entry in beside.entries.items():
        record(item, {**entry, "beside_pretraining": True})
    pack_encoder(unit_snapshot(runs, arm, seed, last), out / "encoders", encoder_stem(rid, arm, seed))
    if beside.failed:
        raise RuntimeError(f"{arm} s{seed}: evaluating a snapshot beside the pretraining failed: {beside.failed}")


def _losses(curve: Path) -> list[tuple[str, str]]:
    """(step, train/loss) of every logged row of a metrics.csv, as written."""
    with open(curve, newline="") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def rebuild_blocked(out: Path, rid: str, arm: str, seed: int) -> str | None:
    """Why the unit cannot be pretrained again here for its encoder, or None: its recorded curve must be home (to
    compare with), the card must be the kind it ran on, and no earlier rebuild on this card at this commit may
    have failed to repeat it within REBUILD_RTOL (that one would most likely fail again)."""
    results, env = study.load_results(out / "results.json"), environment()
    first = results[study.item_key(rid, arm, seed, "pretrain")]
    if not (out / study.curve_file(rid, arm, seed)).is_file():
        return f"its recorded loss curve ({study.curve_file(rid, arm, seed)}) is not here to compare with"
    if env["device"] != first["device"]:
        return f"it was pretrained on {first['device']}, this is {env['device']}"
    failed = sorted(k.rsplit("/", 1)[1] for k, e in results.items()
                    if k.startswith(study.item_key(rid, arm, seed, REBUILD)) and not e["matched"]
                    and (e["device"], e["commit"]) == (env["device"], env["commit"]))
    return f"{', '.join(failed)} did not repeat its pretraining on this card at this commit" if failed else None


def largest_difference(pairs) -> float:
    """The largest relative difference |new - old| / |old| (|new| where old is 0) over (new, old) loss pairs;
    inf where a loss is not finite (a diverged run, or a broken record), which no tolerance admits."""
    return max((abs(new - old) / abs(old) if old else abs(new)) if math.isfinite(new) and math.isfinite(old)
               else math.inf for new, old in pairs)


def rebuild_encoder(recipe_name: str, arm: str, seed: int, out: Path, runs: Path) -> tuple[Path | None, str | None]:
    """Pretrain a recorded unit again (same recipe and seed, so the same data order and initial weights) for its
    last encoder, which did not outlive the machine that made it: encoders/ is not committed (20 MB each). The
    kernels sum in a fixed order, but another machine or commit may still round differently (cuBLAS' choice of
    kernel, a kernel's instruction order), so the run may not repeat bit for bit; its encoder is taken only if
    the loss lies within REBUILD_RTOL of the recorded one at every logged step and at the end. Recorded as item
    rebuild<N> (`matched`, `bitwise`, the largest relative difference and the first step that differs; its wall
    time counts in the report); what is measured from its encoder says `encoder: rebuild<N>`. Returns (the last
    snapshot, now at its place under `runs`, None), or (None, why) where the run did not repeat or cannot start
    (`rebuild_blocked`)."""
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    why = rebuild_blocked(out, rid, arm, seed)
    if why is not None:
        return None, why
    results = study.load_results(out / "results.json")
    first = results[study.item_key(rid, arm, seed, "pretrain")]
    n = sum(k.startswith(study.item_key(rid, arm, seed, REBUILD)) for k in results)
    print(f"[long] {arm} s{seed}: pretrain again for the lost epoch-{recipe['snapshots'][-1]} encoder", flush=True)
    scratch = study._fresh(runs / REBUILD)  # its run, curve and picture, apart from what is trusted and recorded
    entry = study.do_pretrain(recipe, arm, seed, scratch / "runs", scratch, rid, arms=LONG_ARMS)
    curve = study.curve_file(rid, arm, seed)
    losses, recorded = _losses(scratch / curve), _losses(out / curve)
    pairs = [(float(new[1]), float(old[1])) for new, old in zip(losses, recorded)] + [
        (entry["final_loss"], first["final_loss"])]
    differ = next(((new, old) for new, old in zip(losses, recorded) if new != old), None)
    worst = largest_difference(pairs)
    same_steps = [step for step, _ in losses] == [step for step, _ in recorded]
    compared = {"steps_compared": min(len(losses), len(recorded)), "steps_recorded": len(recorded),
                "bitwise": same_steps and differ is None and entry["final_loss"] == first["final_loss"],
                "max_rel_difference": worst,
                "first_difference": None if differ is None else {"step": int(differ[0][0]),
                                                                 "loss": float(differ[0][1]),
                                                                 "recorded_loss": float(differ[1][1])}}
    matched = same_steps and worst <= REBUILD_RTOL
    item = f"{REBUILD}{n}"
    _recorder(out, rid, arm, seed)(item, {**entry, "matched": matched, "rtol": REBUILD_RTOL, **compared})
    last = recipe["snapshots"][-1]
    if not matched:
        shutil.rmtree(scratch, ignore_errors=True)
        return None, (f"pretraining it again did not repeat the recorded run within {REBUILD_RTOL} (final loss "
                      f"{entry['final_loss']} against {first['final_loss']}; {compared})")
    snapshot = study._fresh(unit_snapshot(runs, arm, seed, last))
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(unit_snapshot(scratch / "runs", arm, seed, last), snapshot)
    (snapshot / SOURCE_FILE).write_text(item)
    shutil.rmtree(scratch, ignore_errors=True)
    pack_encoder(snapshot, out / "encoders", encoder_stem(rid, arm, seed))  # home with the call's files
    return snapshot, None


def evaluate_last(recipe_name: str, arm: str, seed: int, out: Path, runs: Path, encoders: Path, evals,
                  rebuild_fits=lambda: False) -> bool:
    """The last snapshot's evaluations `evals`, from the encoder this call pretrained (still under runs/), one
    brought home by an earlier call (in `encoders`, unpacked) or, where `rebuild_fits()`, one pretrained again
    (`rebuild_encoder`); False, running nothing, where none is here."""
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    last = recipe["snapshots"][-1]
    encoder = find_encoder(encoder_stem(rid, arm, seed), (encoders,), unit_snapshot(runs, arm, seed, last))
    why = "its encoder was not carried"
    if encoder is None and rebuild_fits():
        encoder, why = rebuild_encoder(recipe_name, arm, seed, out, runs)
    if encoder is None:
        print(f"[long] {arm} s{seed}: the epoch-{last} evaluations wait: {why}", flush=True)
        return False
    record, source = _recorder(out, rid, arm, seed), encoder_source(encoder)
    evaluate_snapshot(recipe_name, arm, seed, runs, last,
                      lambda item, entry: record(item, {**entry, "encoder": source}), evals)
    return True


def run_units(recipe_name: str, out: Path, runs: Path, budget_s: float | None,
              encoders: Path | None = None, units=None, rebuild: bool = False) -> bool:
    """The unfinished work of the units in order, each piece started only if its estimate fits what is left
    of the budget: a unit's pretraining with its earlier snapshots' evaluations (which must fit whole: those
    snapshots do not outlive the call), then its last snapshot's evaluations, in this call or, from the encoder
    brought home (`encoders`, by default out/encoders), in a later one (with `rebuild`, from the unit pretrained
    again where that encoder is lost and the pretraining fits too). `units`: LONG_UNITS unless given.
    True when every one of them is done."""
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    encoders = out / "encoders" if encoders is None else encoders
    every, epochs = recipe["pretrain_run"].get("snapshot_every", 0), recipe["pretrain"]["epochs"]
    if not every or any(e % every or e > epochs for e in recipe["snapshots"]) or recipe["snapshots"][-1] != epochs:
        raise ValueError(f"{recipe_name}: snapshots {recipe['snapshots']} must be multiples of snapshot_every "
                         f"{every} and end at the last epoch ({epochs})")
    start, runs = time.perf_counter(), runs / rid
    last_items = [i for i in snapshot_items(recipe) if i.endswith(f"_e{recipe['snapshots'][-1]}")]

    def fits(what, item, arm, extra=()):
        results = study.load_results(out / "results.json")
        needed = sum(estimate(results, rid, recipe, i, arm) for i in (item, *extra))
        left = None if budget_s is None else budget_s - (time.perf_counter() - start)
        if left is not None and needed > left:
            print(f"[long] not starting {what}: needs ~{needed:.0f}s, {left:.0f}s left")
            return False
        return True

    finished = True
    for arm, seed in LONG_UNITS if units is None else units:
        results = study.load_results(out / "results.json")
        missing = [i for i in ["pretrain", *snapshot_items(recipe)] if study.item_key(rid, arm, seed, i) not in results]
        if not missing:
            continue
        if any(i not in last_items for i in missing):  # pretraining or an earlier snapshot's evaluation
            if not fits(f"{arm} s{seed} pretrain", "pretrain", arm):
                return False
            pretrain_unit(recipe_name, arm, seed, out, runs)
            missing = last_items
        for item in missing:
            if not fits(f"{arm} s{seed} {item}", item, arm):
                return False
            if not evaluate_last(recipe_name, arm, seed, out, runs, encoders, [item.split("_e")[0]],
                                 lambda: rebuild and fits(f"pretraining {arm} s{seed} again for {item}", item, arm,
                                                          ["pretrain"])):
                finished = False  # a later call carries its encoder; the next units go on
                break
        shutil.rmtree(runs / arm / f"s{seed}", ignore_errors=True)
    return finished


# ---------------------------------------------------------------------------- the full fine-tune


def _holdout(results: dict, rid: str, arm: str):
    """item -> the arm's seed-0 holdout top-1 of that search run, None while it is not recorded."""
    return lambda item: results.get(study.item_key(rid, arm, 0, item), {}).get("val_top1")


def _best(ft: dict, val) -> tuple[int, str]:
    """The best rung's epochs (ties: fewer epochs) and the best of the base and the variants at variant_epochs
    (ties: the base)."""
    rungs = [e for e in ft["ladder"] if val(f"tune_e{e}") is not None]
    at = {"base": val(f"tune_e{ft['variant_epochs']}"), **{v: val(f"tune_{v}") for v in ft["variants"]}}
    return max(rungs, key=lambda e: val(f"tune_e{e}")), max(at, key=lambda v: (at[v], v == "base"))


def _combination(ft: dict, epochs: int, variant: str) -> str | None:
    """The search run of the best variant at the best rung's epochs (`_best`), where that pair was not run
    already."""
    return None if variant == "base" or epochs == ft["variant_epochs"] else f"tune_{variant}_e{epochs}"


def check_finetune_recipe(ft: dict, recipe: dict) -> None:
    """Refuse a search that could select on the test split or compare a variant with a base never run."""
    if not recipe["val_size"]:
        raise ValueError("the fine-tune search needs a holdout (val_size > 0): without one it would select on test")
    if ft["variant_epochs"] not in ft["ladder"][:2]:
        raise ValueError(f"variant_epochs {ft['variant_epochs']} must be one of the ladder's first two rungs "
                         f"{ft['ladder'][:2]} (those always run): the variants are compared with the base there")


def next_finetunes(ft: dict, results: dict, rid: str, arm: str) -> list[tuple[int, str]]:
    """The arm's fine-tunes to run next, as (seed, item), given what is recorded: the epochs ladder rung by rung
    (`tune_e<epochs>`, a rung only while the one before gained `gain` holdout points), then the variants at
    `variant_epochs` (`tune_<variant>`), then the best variant at the best rung's epochs if that pair has not
    run (`tune_<variant>_e<epochs>`), then `ft100` of every seed with `finetune_choice`; [] when all are done."""
    val = _holdout(results, rid, arm)
    for i, epochs in enumerate(ft["ladder"]):
        if val(f"tune_e{epochs}") is None:
            return [(0, f"tune_e{epochs}")]
        if i and val(f"tune_e{epochs}") - val(f"tune_e{ft['ladder'][i - 1]}") < ft["gain"]:
            break
    variants = [(0, f"tune_{name}") for name in ft["variants"] if val(f"tune_{name}") is None]
    if variants:
        return variants
    combination = _combination(ft, *_best(ft, val))
    if combination is not None and val(combination) is None:
        return [(0, combination)]
    return [(seed, "ft100") for seed in SEEDS if study.item_key(rid, arm, seed, "ft100") not in results]


def still_gaining(ft: dict, results: dict, rid: str, arm: str) -> bool:
    """Whether the ladder's last rung ran and still gained `gain` holdout points over the one before: the
    search stopped at the ladder's end, not because more epochs stopped helping."""
    val, (before, last) = _holdout(results, rid, arm), ft["ladder"][-2:]
    return None not in (val(f"tune_e{last}"), val(f"tune_e{before}")) and \
        val(f"tune_e{last}") - val(f"tune_e{before}") >= ft["gain"]


def finetune_choice(ft: dict, results: dict, rid: str, arm: str) -> dict:
    """The settings the holdout chose for the arm's final fine-tunes, every one of them run on the holdout: the
    best rung's epochs with the best variant where that pair beat the rung, else the rung's base settings."""
    val = _holdout(results, rid, arm)
    epochs, variant = _best(ft, val)
    combination = _combination(ft, epochs, variant)
    if combination is not None:
        if val(combination) is None:
            raise ValueError(f"{arm}: {combination} is not recorded yet; the choice waits for it")
        variant = variant if val(combination) > val(f"tune_e{epochs}") else "base"
    item = (f"tune_e{epochs}" if variant == "base" else
            f"tune_{variant}" if epochs == ft["variant_epochs"] else f"tune_{variant}_e{epochs}")
    return {"epochs": epochs, "variant": variant, "search_run": item, "holdout_top1": val(item)}


def finetune_spec(ft: dict, item: str, choice: dict | None) -> tuple[dict, list[str]]:
    """An item's classifier settings and its command-line overrides: a rung is the base at its epochs, a variant
    the base at variant_epochs with the variant's overrides (at <epochs> with a `_e<epochs>` suffix), ft100
    the choice."""
    name = item.removeprefix("tune_")
    if item == "ft100":
        epochs, variant = choice["epochs"], choice["variant"]
    elif name[:1] == "e" and name[1:].isdigit():
        epochs, variant = int(name[1:]), "base"
    elif (pair := name.rpartition("_e"))[0] in ft["variants"] and pair[2].isdigit():
        variant, epochs = pair[0], int(pair[2])
    else:
        epochs, variant = ft["variant_epochs"], name
    flags = study._flags(ft["run"]) + study._flags({} if variant == "base" else ft["variants"][variant])
    return {**ft["base"], "epochs": epochs}, flags


def finetune_estimate(results: dict, rid: str, ft: dict, epochs: int) -> float:
    """Seconds a fine-tune of `epochs` should take, from this recipe's measured fine-tunes: where they recorded
    their images per epoch, the epochs at the slowest training rate plus the most time spent outside training
    (compilation, evaluation); else the slowest seconds per epoch (compilation spread over the epochs, so high
    for longer runs); else the recipe's guess. 1.1x margin and 20 s for start-up and the test pass."""
    mine = [e for k, e in results.items() if k.startswith(rid + "/") and "epochs" in e]
    timed = [e for e in mine if "images_per_epoch" in e]
    if timed:
        train_s = {id(e): e["epochs"] * e["images_per_epoch"] / e["img_s"] for e in timed}
        seconds = (max(e["wall_s"] - train_s[id(e)] for e in timed)
                   + epochs * max(e["images_per_epoch"] / e["img_s"] for e in timed))
    elif mine:
        seconds = epochs * max(e["wall_s"] / e["epochs"] for e in mine)
    else:
        seconds = ft["estimate_s"]["start"] + ft["estimate_s"]["epoch"] * epochs
    return 1.1 * seconds + 20


def find_encoder(stem: str, folders, model_dir: Path) -> Path | None:
    """Encoder `stem` as a model folder: model_dir itself if it holds a model (a snapshot this call pretrained),
    else unpacked into it from the first of `folders` that holds the encoder; None where none does."""
    if (model_dir / CONFIG_NAME).is_file():
        return model_dir
    for folder in folders:
        if folder is not None and (folder / f"{stem}.json").is_file():
            return unpack_encoder(folder, stem, model_dir)
    return None


def run_finetunes(ft_name: str, out: Path, runs: Path, seconds_left, encoders: Path | None = None,
                  arms=None, rebuild: bool = False) -> bool:
    """The fine-tune stage's next items, arm by arm (`arms`, by default LONG_FT_ARMS), each started only if its
    estimate fits `seconds_left()` (None: no budget) and, for a pretrained arm, its pretraining is recorded and
    its encoder here (this call's, in out/encoders, or one carried in `encoders`; with `rebuild`, a lost one is
    pretrained again where that fits); an arm that cannot go on gives way to the next. True when every arm's
    final fine-tunes are recorded."""
    ft, rid = LONG_FT_RECIPES[ft_name], ft_recipe_id(ft_name)
    recipe, pre_rid = LONG_RECIPES[ft["pretraining"]], recipe_id(ft["pretraining"], LONG_RECIPES)
    check_finetune_recipe(ft, recipe)
    runs, finished = runs / rid, True
    for arm in LONG_FT_ARMS if arms is None else arms:
        while todo := next_finetunes(ft, results := study.load_results(out / "results.json"), rid, arm):
            seed, item = todo[0]
            choice = finetune_choice(ft, results, rid, arm) if item == "ft100" else None
            spec, flags = finetune_spec(ft, item, choice)
            needed, left = finetune_estimate(results, rid, ft, spec["epochs"]), seconds_left()
            why, pretrained = None, None
            if arm in LONG_ARMS:  # scratch starts from random weights
                if study.item_key(pre_rid, arm, seed, "pretrain") not in results:
                    why = f"its pretraining ({pre_rid}) is not recorded"
                else:  # unpacked afresh: a folder left by an earlier run could hold another encoder
                    pretrained = find_encoder(encoder_stem(pre_rid, arm, seed), (encoders, out / "encoders"),
                                              study._fresh(runs / "encoders" / f"{arm}_s{seed}"))
                    if pretrained is None:
                        blocked = rebuild_blocked(out, pre_rid, arm, seed)
                        again = estimate(results, pre_rid, recipe, "pretrain", arm)
                        if rebuild and blocked is None and (left is None or again <= left):
                            pretrained, why = rebuild_encoder(ft["pretraining"], arm, seed, out, runs)
                            left = seconds_left()
                        else:
                            why = "its encoder is not here (" + (
                                f"and cannot be rebuilt: {blocked})" if blocked else
                                f"pretraining it again needs ~{again:.0f}s{'' if rebuild else ', with --rebuild'})")
            if why is None and left is not None and needed > left:
                why = f"needs ~{needed:.0f}s, {left:.0f}s left"
            if why is not None:
                print(f"[long] {arm} s{seed} {item} waits: {why}", flush=True)
                finished = False
                break
            print(f"[long] {arm} s{seed}: {item} ({spec['epochs']} epochs{' '.join(['', *flags])})", flush=True)
            run_dir = study._fresh(runs / arm / f"s{seed}" / item)
            entry = study.evaluate_encoder({**recipe, "evals": {item: spec}}, item, seed, run_dir, pretrained,
                                           flags_after=flags, test=item == "ft100")
            if entry["val_top1"] is None:  # the search would schedule it again and again
                raise RuntimeError(f"{arm} s{seed} {item} reported no holdout accuracy")
            last = study._train_rows(run_dir)[-1]  # what finetune_estimate needs: the images of one epoch
            entry["images_per_epoch"] = round(int(last["step"]) / float(last["epoch"])) * spec["batch_size"]
            if pretrained is not None:
                entry["encoder"] = encoder_source(pretrained)
            _recorder(out, rid, arm, seed)(item, {**entry, "flags": flags, **({"choice": choice} if choice else {})})
    return finished


def epoch_starts(curve: Path, batch_size: int) -> dict:
    """Where a pretraining's time goes, from its loss curve (metrics.csv): the trainer logs images/s over the
    steps since its last row, restarting the count at every epoch's start. Returns the first step's seconds
    (compilation), the steady images/s (median of the windows inside an epoch), and the extra seconds of the
    windows that start an epoch over that rate (the wait for the loader's first batch), per window and in all."""
    rows = [r for r in csv.DictReader(open(curve, newline="")) if r.get("train/img_s")]
    per_epoch = round(int(rows[-1]["step"]) / float(rows[-1]["epoch"]))
    windows, prev = [], int(rows[0]["step"])
    for r in rows[1:]:
        step = int(r["step"])
        epoch_start = per_epoch * ((step - 1) // per_epoch)
        start = max(prev, epoch_start)
        windows.append((start == epoch_start, step - start, float(r["train/img_s"])))
        prev = step
    steady = statistics.median(rate for at_start, _, rate in windows if not at_start)
    extra = [n * batch_size / rate - n * batch_size / steady for at_start, n, rate in windows if at_start]
    return dict(steps_per_epoch=per_epoch, first_step_s=batch_size / float(rows[0]["train/img_s"]),
                steady_img_s=steady, epoch_start_windows=len(extra), extra_s_per_epoch_start=statistics.mean(extra),
                extra_s_total=sum(extra))


def finetune_recipe(recipe_name: str) -> str:
    """The fine-tune recipe that starts from `recipe_name`'s encoders."""
    return next(name for name, ft in LONG_FT_RECIPES.items() if ft["pretraining"] == recipe_name)


def needed_encoders(recipe_name: str, out: Path) -> list[str]:
    """The encoders the next calls need, in the order they need them: units whose last snapshot's evaluations
    are missing, then each arm's next fine-tune."""
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    ft_name = finetune_recipe(recipe_name)
    results, ft_rid = study.load_results(out / "results.json"), ft_recipe_id(ft_name)
    stems = [encoder_stem(rid, arm, seed) for arm, seed in LONG_UNITS
             if study.item_key(rid, arm, seed, "pretrain") in results
             and any(study.item_key(rid, arm, seed, i) not in results for i in snapshot_items(recipe))]
    for arm in LONG_FT_ARMS:
        todo = next_finetunes(LONG_FT_RECIPES[ft_name], results, ft_rid, arm)
        if todo and arm in LONG_ARMS and study.item_key(rid, arm, todo[0][0], "pretrain") in results:
            stems.append(encoder_stem(rid, arm, todo[0][0]))
    return list(dict.fromkeys(stems))


def stage(recipe_name: str, out: Path, carry: Path, limit_bytes: int) -> list[str]:
    """Fill `carry` (emptied first) with the encoders the next call needs first, as many as fit `limit_bytes`
    (the device takes 64 MiB of working tree in all); the call reads them with --encoders. Returns their stems."""
    shutil.rmtree(carry, ignore_errors=True)
    carry.mkdir(parents=True)
    staged, size = [], 0
    for stem in needed_encoders(recipe_name, out):
        files = sorted((out / "encoders").glob(f"{stem}.*"))
        if not files:
            print(f"[long] stage: {stem} is needed but not home (lost with its machine? `run --rebuild` "
                  "pretrains it again)")
            continue
        nbytes = sum(f.stat().st_size for f in files)
        if size + nbytes > limit_bytes:
            break
        for f in files:
            shutil.copy(f, carry / f.name)
        staged.append(stem)
        size += nbytes
    print(f"[long] staged {staged or 'no encoder'} in {carry} ({size / 2**20:.1f} MiB)")
    return staged


def status(recipe_name: str, out: Path) -> None:
    recipe, rid = LONG_RECIPES[recipe_name], recipe_id(recipe_name, LONG_RECIPES)
    results = study.load_results(out / "results.json")
    for arm, seed in LONG_UNITS:
        items = ["pretrain", *snapshot_items(recipe)]
        done = sum(study.item_key(rid, arm, seed, i) in results for i in items)
        encoder = (out / "encoders" / f"{encoder_stem(rid, arm, seed)}.json").is_file()
        print(f"{arm} s{seed}: {done}/{len(items)} items" + (", encoder home" if encoder else ""))
    ft_name = finetune_recipe(recipe_name)
    ft, ft_rid = LONG_FT_RECIPES[ft_name], ft_recipe_id(ft_name)
    for arm in LONG_FT_ARMS:
        done = sorted(k.split("/", 1)[1] for k in results if k.startswith(f"{ft_rid}/{arm}/"))
        todo = next_finetunes(ft, results, ft_rid, arm)
        print(f"fine-tune {arm}: done {done or 'nothing'}; next {todo[:1] or 'nothing (finished)'}")


def merge(returned: Path, out: Path) -> None:
    """Bring one call's folder home: its long.tgz through study.merge, its encoder files into out/encoders/
    (those of the pretrainings it recorded, and of the rebuilds that repeated theirs where no encoder of that unit
    is here already)."""
    archive = returned / "long.tgz"
    if not archive.is_file():
        raise SystemExit(f"merge: no long.tgz in {returned}")
    merged = study.merge(archive, out)
    results = study.load_results(out / "results.json")
    home = out / "encoders"

    def stem_of(key):
        rid, arm, seed, _ = key.split("/")
        return encoder_stem(rid, arm, int(seed[1:]))

    def source(stem):  # the run that made the returned encoder: "pretrain" or a rebuild's item
        return json.loads((returned / f"{stem}.json").read_text()).get("encoder_source", "pretrain")

    new = set(merged["added"] + merged["replaced"])
    taken = set()
    for key in results:  # the runs that make encoders: pretrainings, and rebuilds that repeated theirs
        item = key.rsplit("/", 1)[1]
        if not (item == "pretrain" or item.startswith(REBUILD) and results[key]["matched"]):
            continue
        stem = stem_of(key)
        if not (returned / f"{stem}.json").is_file():
            continue
        at_home = (home / f"{stem}.json").is_file()
        if key in new:  # a rebuild never replaces an encoder kept here (the unit's own, or an earlier rebuild)
            if source(stem) == "pretrain" or not at_home:
                taken.add(stem)
        # a run recorded here already, identically (a later call of the same chain, which carried the record on,
        # was merged first): its encoder, where none is here
        elif key not in merged["reruns"] and not at_home and source(stem) == item:
            taken.add(stem)
    encoders = [p for p in sorted(returned.glob("enc-*")) if p.name.split(".")[0] in taken]
    skipped = len(list(returned.glob("enc-*"))) - len(encoders)
    home.mkdir(parents=True, exist_ok=True)
    for path in encoders:  # only those of pretrainings recorded here: a repeat's encoder would not match them
        shutil.copy(path, home / path.name)
    print(f"[long] {len(encoders)} encoder files brought home to {home}"
          + (f"; {skipped} left out (of repeated pretrainings, or rebuilds of encoders kept here)" if skipped else ""))


def pack_call(out: Path, dest: Path) -> None:
    """A call's results for the trip home: long.tgz (results.json, start.json, curves, figures) and the
    encoder files beside it (the device returns 8 files of at most 16 MiB)."""
    with tarfile.open(dest / "long.tgz", "w:gz") as tar:
        for name in ("results.json", "start.json", "curves", "figures"):
            if (out / name).exists():
                tar.add(out / name, arcname=f"long/{name}")
    for path in sorted((out / "encoders").glob("enc-*")) if (out / "encoders").is_dir() else []:
        shutil.copy(path, dest / path.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("run", "status", "merge", "pack", "stage", "eval-snapshot",
                                            "epoch-starts"))
    parser.add_argument("--recipe", default="long-h100", choices=sorted(LONG_RECIPES))
    parser.add_argument("--budget-min", type=float, default=None,
                        help="run: start no unit or fine-tune that would end past this")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json, curves/, figures/ go")
    parser.add_argument("--runs", type=Path, default=HERE / "runs", help="scratch space for the runs' weights")
    parser.add_argument("--only", choices=("units", "finetunes"),
                        help="run: only the claim's pretraining units, or only the fine-tunes (a call that carries "
                             "an encoder for them); by default both, then the single-seed units")
    parser.add_argument("--ft-arms", nargs="+", choices=LONG_FT_ARMS, default=None,
                        help="run: the fine-tune stage's arms, in this order (default: all, scratch first)")
    parser.add_argument("--rebuild", action="store_true",
                        help="run: pretrain a recorded unit again where its encoder is needed and lost (taken only "
                             f"if its loss curve repeats the recorded one within {REBUILD_RTOL:g}, relative); by "
                             "default that work waits")
    parser.add_argument("--encoders", type=Path, default=None,
                        help="run: where encoders brought home by earlier calls are read (default OUT/encoders)")
    parser.add_argument("--returned", type=Path, help="merge: a GPU call's folder (long.tgz and enc-* files)")
    parser.add_argument("--carry", type=Path, default=HERE / "carry",
                        help="stage: the folder the next call carries (emptied, then given the encoders it needs)")
    parser.add_argument("--carry-mib", type=float, default=24.0,
                        help="stage: at most this much (30 MB of Fashion-MNIST and the tree travel too, in 64 MiB)")
    parser.add_argument("--dest", type=Path, help="pack: the folder the call's files go to ($OUT)")
    parser.add_argument("--arm", choices=sorted(LONG_ARMS), help="eval-snapshot: the unit's arm")
    parser.add_argument("--seed", type=int, help="eval-snapshot: the unit's seed")
    parser.add_argument("--epoch", type=int, help="eval-snapshot: the snapshot's epoch")
    parser.add_argument("--entries", type=Path, help="eval-snapshot: the JSON file its entries go to")
    parser.add_argument("--curve", type=Path, help="epoch-starts: a pretraining's metrics.csv (loss curve)")
    parser.add_argument("--batch-size", type=int, help="epoch-starts: that run's images per step")
    args = parser.parse_args(argv)
    if args.command == "epoch-starts":
        if args.curve is None or args.batch_size is None:
            parser.error("epoch-starts needs --curve CSV and --batch-size N")
        print(json.dumps(epoch_starts(args.curve, args.batch_size), indent=1))
        return 0
    if args.command == "eval-snapshot":  # pretrain_unit's helper process (SnapshotEvaluator)
        if None in (args.arm, args.seed, args.epoch, args.entries):
            parser.error("eval-snapshot needs --arm, --seed, --epoch and --entries")
        entries = {}
        evaluate_snapshot(args.recipe, args.arm, args.seed, args.runs, args.epoch, entries.__setitem__)
        study.atomic_write(args.entries, lambda tmp: tmp.write_text(json.dumps(entries)))
        return 0
    if args.command == "merge":
        if args.returned is None:
            parser.error("merge needs --returned DIR (a GPU call's folder)")
        merge(args.returned, args.out)
        return 0
    if args.command == "pack":
        if args.dest is None:
            parser.error("pack needs --dest DIR")
        pack_call(args.out, args.dest)
        return 0
    if args.command == "status":
        status(args.recipe, args.out)
        return 0
    if args.command == "stage":
        stage(args.recipe, args.out, args.carry, int(args.carry_mib * 2**20))
        return 0
    start, budget = time.perf_counter(), None if args.budget_min is None else 60 * args.budget_min

    def left():
        return None if budget is None else budget - (time.perf_counter() - start)

    # the claim's units, the fine-tunes in the time they leave, and only then the single-seed units (the first cut)
    units = args.only == "finetunes" or run_units(args.recipe, args.out, args.runs, budget, args.encoders,
                                                  [u for u in LONG_UNITS if u not in LONG_LAST_UNITS], args.rebuild)
    done = args.only == "units" or run_finetunes(finetune_recipe(args.recipe), args.out, args.runs, left,
                                                 args.encoders, args.ft_arms, args.rebuild)
    done = done and units and args.only is None and args.ft_arms is None  # not with some arms left out
    if done:
        done = run_units(args.recipe, args.out, args.runs, left(), args.encoders, LONG_LAST_UNITS, args.rebuild)
    status(args.recipe, args.out)
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
