"""Datasets, the STAR sequence batcher and transforms. Every dataset exposes `.classes` and `.targets`."""

from pathlib import Path

from .fashion_mnist import FashionMNIST, download_fashion_mnist, find_fashion_mnist
from .folder import CorruptImageError, ImageFolder, convert_image
from .shards import ShardDataset, write_shards
from .sequences import StarBatchSampler, build_sequence_loader, collate_sequences
from .subsets import LabeledSubset, label_subset, train_val_split
from .synthetic import SyntheticImages, write_image_folder
from .transforms import (
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, PRESETS, DataPreset,
    build_mixup, finetune_transform, pretrain_transform,
)

DATASET_NAMES = ("fashion-mnist", "synthetic")
SPLITS = ("train", "val", "test")


def build_dataset(name, split, transform=None, root=None, in_chans=None, img_size=None, skip_corrupt=False,
                  num_samples=None, num_classes=None, seed=0):
    """Build a dataset by name: "fashion-mnist", "synthetic", or a path to an ImageNet-layout folder or to
    the WebDataset-format tar shards `star shards` wrote from one (<path>/<split>/*.tar).

    split: "train", "val" or "test". Fashion-MNIST has no val split, so "val" means its official test
    set (use `train_val_split` for a holdout); synthetic "val"/"test" draw images disjoint from "train".
    Defaults: in_chans 1 for Fashion-MNIST, 3 otherwise; synthetic 32 px, 10 classes, 1024 train / 256
    eval samples.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "fashion-mnist":
        return FashionMNIST(root, "train" if split == "train" else "test", transform, in_chans=in_chans or 1)
    if name == "synthetic":
        return SyntheticImages(
            (1024 if split == "train" else 256) if num_samples is None else num_samples,
            32 if img_size is None else img_size,
            3 if in_chans is None else in_chans,
            10 if num_classes is None else num_classes,
            seed=seed,
            transform=transform,
            stream=SPLITS.index(split),
        )
    if (Path(name) / split / "index.json").is_file() or any((Path(name) / split).glob("*.tar")):
        if skip_corrupt:
            raise ValueError(f"{name}: skip_corrupt works on image folders, not on shards; find the bad files in "
                             "the folder (a run over it with skip_corrupt lists them) before writing shards")
        return ShardDataset(name, split, transform, in_chans=in_chans or 3)
    if Path(name).is_dir():
        return ImageFolder(name, split, transform, in_chans=in_chans or 3, skip_corrupt=skip_corrupt)
    raise ValueError(
        f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}, or give the path of an existing "
        "ImageNet-layout folder (<root>/train/<class>/<image>, <root>/val/<class>/<image>)"
    )


__all__ = [
    "build_dataset", "DATASET_NAMES",
    "FashionMNIST", "find_fashion_mnist", "download_fashion_mnist", "ImageFolder", "CorruptImageError", "convert_image", "SyntheticImages",
    "write_image_folder",
    "ShardDataset", "write_shards", "StarBatchSampler", "collate_sequences", "build_sequence_loader",
    "train_val_split", "label_subset", "LabeledSubset",
    "pretrain_transform", "finetune_transform", "build_mixup", "DataPreset", "PRESETS",
    "IMAGENET_MEAN", "IMAGENET_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
]
