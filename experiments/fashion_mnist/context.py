"""Why does accuracy fall as K grows? Two measurements on encoders pretrained with the study's recipe.

1. Next-cluster loss by position in the sequence: sequences of K test images (the K the encoder was pretrained
   with), the loss of the image at each position 1..K, over clusters 2..16 only (the first cluster is a target
   only with a separator). Lower at later positions: the model uses the earlier, unrelated images; higher:
   they get in its way.
2. A causal linear probe, with and without a prefix: an image's features are the last encoder level as the
   decoder reads it (LayerNormed), averaged over the image's tokens, read alone (a fresh state, as
   fine-tuning reads an image) and after m other images (as pretraining at K = m + 1 does). A linear
   classifier is fitted on the features of the study's 55k training part and scored on the 10k test images.
   Better after a prefix than alone: fine-tuning reads the encoder outside the context it was trained in.
   It also probes the causal features alone, which the study's 4-direction linear probe does not.

    python -m experiments.fashion_mnist.context [--out DIR] [--arms arm_k1 star_k4 k4_nosep star_k16] [--seeds 0]

Each arm's encoder is pretrained with the study's recipe and each seed (a separate run from the study's, which
keeps no weights) into --runs, and reused from there when present. Results go to DIR/context.json, one entry
per arm and seed, written as each finishes; `pretraining` in an entry holds the pretraining's time and final loss
(null when the weights were reused).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from star.build import classification_transform
from star.data import build_dataset, train_val_split
from star.models import load_pretrained
from star.training import resolve_device
from star.training.provenance import environment

from .recipes import ARMS, RECIPES, recipe_id
from .study import HERE, do_pretrain, load_results, pretrain_config, save_result

DEFAULT_ARMS = ("arm_k1", "star_k4", "k4_nosep", "star_k16")


def result_key(rid: str, arm: str, seed: int) -> str:
    return f"{rid}/{arm}/s{seed}"


def load_images(cfg, model, split: str, device, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A split as one tensor (N, C, H, W), resized and normalized as the classifiers evaluate, its labels and
    the number of classes."""
    transform = classification_transform(cfg, model.img_size, model.in_chans, train=False)
    data = build_dataset(cfg.data.dataset, split, transform, in_chans=model.in_chans, img_size=model.img_size,
                         num_samples=cfg.data.num_samples, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=1024, num_workers=cfg.data.num_workers)
    images, labels = zip(*loader)
    return torch.cat(images).to(device), torch.cat(labels).to(device), len(data.classes)


def prefixes_of(n: int, prefix: int, generator: torch.Generator) -> torch.Tensor:
    """(n, prefix) indices: for each image, `prefix` others drawn at random (never the image itself)."""
    if prefix and n < 2:
        raise ValueError(f"a prefix of other images needs at least 2 images, got {n}")
    others = torch.randint(0, max(n - 1, 1), (n, prefix), generator=generator)
    return others + (others >= torch.arange(n)[:, None]).long()


@torch.no_grad()
def loss_by_position(model, images: torch.Tensor, batch: int) -> list[float]:
    """Mean next-cluster MSE of the image at each position of K-image sequences, clusters 2.. only."""
    k = model.num_images
    usable = len(images) // k * k
    seqs = images[:usable].reshape(-1, k, *images.shape[1:])
    kept = model.grid ** 2 - model.cluster_len  # targets past the first cluster, the same with or without separator
    if kept <= 0:
        raise ValueError("one cluster per image: no target past the first cluster to compare positions by")
    total = torch.zeros(k, device=images.device, dtype=torch.float64)
    for start in range(0, len(seqs), batch):
        out = model(seqs[start:start + batch])
        err = (out["pred"][:, :, -kept:] - out["target"][:, :, -kept:]).pow(2).mean(dim=(2, 3))
        total += err.sum(0).double()
    return (total / len(seqs)).tolist()


@torch.no_grad()
def features(model, images: torch.Tensor, prefix: int, generator: torch.Generator) -> torch.Tensor:
    """Features of each image read after `prefix` other images: the last encoder level as the decoder reads it
    (its LayerNorm), averaged over the image's tokens. (N, D)."""
    out = []
    per_image = model.separator_len + model.grid ** 2
    others = prefixes_of(len(images), prefix, generator).to(images.device)
    batch = max(1, 1024 // (prefix + 1))
    for start in range(0, len(images), batch):
        own = images[start:start + batch, None]
        seqs = torch.cat([images[others[start:start + batch]], own], dim=1)
        tokens = model.forward_features(model.build_sequence(seqs))[-1]
        last = tokens[:, prefix * per_image + model.separator_len:(prefix + 1) * per_image]
        out.append(model.feature_norms[-1](last).mean(1).float())
    return torch.cat(out)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, steps: int = 200) -> float:
    """Multinomial logistic regression on standardized features (full batch, L-BFGS, small L2); test top-1 %."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item() * 100


def measure(recipe_name: str, arm: str, seed: int, runs: Path, out: Path, prefixes=None) -> dict:
    """Pretrain (or reuse) the arm's encoder of this seed, then both measurements. `prefixes`: the m of the probe
    besides 0 (alone, always measured), by default K - 1 (the arm's own context; 3 for K = 1)."""
    recipe, rid = RECIPES[recipe_name], recipe_id(recipe_name)
    weights = runs / rid / arm / f"s{seed}" / "pretrain"
    start = time.perf_counter()
    pretraining = None
    if not (weights / "model").is_dir():  # its loss curve and picture stay in the runs folder, not the study's
        pretraining = do_pretrain(recipe, arm, seed, runs / rid, weights.parent, rid)
    cfg = pretrain_config(recipe, arm, seed, weights)
    device = resolve_device(cfg.device)
    model = load_pretrained(weights / "model").to(device).eval()
    train_x, train_y, num_classes = load_images(cfg, model, "train", device, seed)
    keep = torch.tensor(train_val_split(len(train_x), recipe["val_size"], seed)[0], device=device)
    train_x, train_y = train_x[keep], train_y[keep]  # the study's training part: the holdout stays out
    test_x, test_y, _ = load_images(cfg, model, "test", device, seed)
    k = model.num_images
    prefixes = sorted({0, *(prefixes if prefixes is not None else [k - 1 if k > 1 else 3])})  # 0: the baseline
    generator = torch.Generator().manual_seed(seed)
    probe = {}
    for m in prefixes:
        fit = [features(model, x, m, generator) for x in (train_x, test_x)]
        probe[str(m)] = linear_probe(fit[0], train_y, fit[1], test_y, num_classes)
    shuffled = test_x[torch.randperm(len(test_x), generator=generator).to(device)]
    entry = {"arm": arm, "seed": seed, "num_images": k, "separator": model.init_args["separator"],
             "loss_by_position": loss_by_position(model, shuffled, max(1, 1024 // k)), "probe_top1_by_prefix": probe,
             "train_images": len(train_x), "test_images": len(test_x), "pretraining": pretraining,
             "wall_s": time.perf_counter() - start,
             "recipe": rid, **environment(device)}
    save_result(out / "context.json", result_key(rid, arm, seed), entry)
    print(f"[context] {arm} s{seed}: loss by position {[round(v, 4) for v in entry['loss_by_position']]}, "
          f"probe top-1 by prefix {({m: round(v, 2) for m, v in probe.items()})}", flush=True)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        choices=[a for a, spec in ARMS.items() if spec is not None])
    parser.add_argument("--prefix", type=int, nargs="+", default=None,
                        help="probe after these numbers of other images too (default: K - 1 of each arm; 0, "
                             "alone, is always probed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds, one encoder each")
    parser.add_argument("--recipe", default="h100", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=HERE, help="where context.json goes")
    parser.add_argument("--runs", type=Path, default=HERE / "runs" / "context",
                        help="pretrained weights (reused when present; apart from the study's, which it deletes)")
    args = parser.parse_args(argv)
    if args.prefix is not None and min(args.prefix) < 0:
        parser.error("--prefix takes numbers of images >= 0")
    done = load_results(args.out / "context.json")
    for seed in args.seeds:
        for arm in args.arms:
            if result_key(recipe_id(args.recipe), arm, seed) in done:
                print(f"[context] {arm} s{seed}: already in {args.out / 'context.json'}")
                continue
            measure(args.recipe, arm, seed, args.runs, args.out, args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
