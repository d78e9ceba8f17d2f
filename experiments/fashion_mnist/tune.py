"""Choose the study's fine-tuning recipe on the 5k holdout (never the test split).

    python -m experiments.fashion_mnist.tune --out DIR [--budget-min 9]

Pretrains one STAR K=4 encoder with the study's pretraining recipe (seed 0), then fine-tunes it on all
55k training labels with each variant of VARIANTS in turn and records the holdout top-1 (and images/s)
in DIR/tune.json, appending to what is there; variants already in it are not run again. The variants
differ only in the optimizer settings the issue left open (lr, layer decay, epochs, batch); data,
augmentation and model are the study's. Last, the best variant runs again with twice the epochs, to show
how much longer fine-tuning buys.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from star.cli.train import run
from star.training.provenance import environment

from .recipes import RECIPES, recipe_id
from .study import _throughput, do_pretrain, eval_config, load_results, save_result

# name -> optimizer overrides of a full (100% labels) fine-tune.
VARIANTS = {
    "b1024_blr1e-3_ld75_e6": dict(epochs=6, batch_size=1024, blr=1e-3, layer_decay=0.75),
    "b1024_blr2e-3_ld90_e6": dict(epochs=6, batch_size=1024, blr=2e-3, layer_decay=0.9),
    "b1024_blr5e-3_ld100_e6": dict(epochs=6, batch_size=1024, blr=5e-3, layer_decay=1.0),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/star-tune"))
    parser.add_argument("--recipe", default="h100", choices=sorted(RECIPES))
    parser.add_argument("--budget-min", type=float, default=None, help="start no variant after this")
    args = parser.parse_args(argv)
    recipe, start = RECIPES[args.recipe], time.perf_counter()
    path = args.out / "tune.json"
    results = load_results(path)
    key = lambda name: f"{recipe_id(args.recipe)}/{name}"  # noqa: E731

    def pending() -> list:
        """The grid's variants not run yet; once all are, the best of them again with twice the epochs."""
        todo = [(name, optim) for name, optim in VARIANTS.items() if key(name) not in results]
        if not todo:
            best = max(VARIANTS, key=lambda v: results[key(v)]["val_top1"])
            if key(f"{best}_x2") not in results:
                todo = [(f"{best}_x2", dict(VARIANTS[best], epochs=2 * VARIANTS[best]["epochs"]))]
        return todo

    if pending():
        entry = do_pretrain(recipe, "star_k4", 0, args.runs, args.runs, recipe_id(args.recipe))  # not the study's
        print(f"[tune] pretrained: {entry}", flush=True)
    while queue := pending():
        name, optim = queue[0]
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            print(f"[tune] out of budget before {name}")
            break
        spec = dict(task="finetune", label_fraction=1.0, **optim)
        variant = {**recipe, "evals": {**recipe["evals"], name: spec}}
        run_dir = args.runs / "star_k4" / "s0" / name
        cfg = eval_config(variant, name, 0, run_dir, args.runs / "star_k4" / "s0" / "pretrain")
        t0 = time.perf_counter()
        val = run(cfg)
        if "val/top1" not in val:
            raise RuntimeError(f"variant {name} reported no holdout accuracy (got {sorted(val)})")
        results[key(name)] = {"val_top1": val["val/top1"], "val_loss": val.get("val/loss"),
                              "wall_s": time.perf_counter() - t0, "img_s": _throughput(run_dir), "optim": optim,
                              **environment()}
        print(f"[tune] {name}: {results[key(name)]}", flush=True)
        save_result(path, key(name), results[key(name)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
