"""Data-loading throughput of the pretraining input pipeline: ImageNet-layout folder vs tar shards.

    python benchmarks/loader.py --images 2000 --workers 1 4 --out loader.json

Writes an ImageNet-like folder of JPEGs (default 500x375, the ImageNet median), packs it into shards,
then times full epochs of the STAR pretraining loader (decode, RandomResizedCrop 192 + flip,
normalize, collate into sequences) with each worker count, and reports images/s and images/s per
worker (one worker is one core). Pretraining STAR-B needs the loader to keep up with the GPUs'
images/s (benchmarks/ddp_throughput.py), so: cores needed = GPU images/s / (images/s per core).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from star.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, build_sequence_loader, pretrain_transform
from star.data.shards import ShardDataset, write_shards


def write_jpeg_folder(root: Path, num_images: int, width: int, height: int, num_classes: int = 10) -> None:
    """Smooth random images with some texture: they compress and decode like photos, unlike pure noise."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / "train" / f"class_{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.integers(-12, 13, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:06d}.jpg", quality=90)


def time_epoch(dataset, workers: int, batch_size: int) -> float:
    loader = build_sequence_loader(dataset, batch_size, images_per_seq=4, num_workers=workers)
    next(iter(loader))  # start the workers before timing
    start = time.perf_counter()
    images = sum(batch[0].shape[0] * batch[0].shape[1] for batch in loader)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count()])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    transform = pretrain_transform(192, IMAGENET_MEAN, IMAGENET_STD)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        write_jpeg_folder(root, args.images, *args.size)
        start = time.perf_counter()
        write_shards(root, shards, "train", samples_per_shard=1000)
        write_s = time.perf_counter() - start
        datasets = {"folder": ImageFolder(root, "train", transform), "shards": ShardDataset(shards, "train", transform)}
        for workers in args.workers:
            for name, dataset in datasets.items():
                rate = time_epoch(dataset, workers, args.batch_size)
                results.append({"source": name, "workers": workers, "images_per_s": rate,
                                "images_per_s_per_core": rate / max(workers, 1)})
                print(f"{name:>7} {workers:>3} workers: {rate:8.0f} images/s, {rate / max(workers, 1):6.0f} per core")
    summary = {"images": args.images, "size": list(args.size), "cpu_count": os.cpu_count(),
               "shard_write_images_per_s": args.images / write_s, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
