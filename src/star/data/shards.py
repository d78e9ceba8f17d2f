"""WebDataset-format tar shards: write them from an ImageNet-layout folder, read them as a dataset.

A shard is a plain tar file of samples, each sample two members sharing a key:
`<key>.<jpg|png|...>` (the original encoded bytes) and `<key>.cls` (the class index as ASCII),
the layout WebDataset and its tools read and write. 1.28M small files become a few hundred large
ones, which copy, cache and read much faster on networked and parallel file systems.

The reader does not stream samples in tar order: `index.json` beside the shards (made by the writer,
or by scanning the tar headers for shards from elsewhere) gives each sample's byte offset, so
`ShardDataset` is a map-style dataset that reads one sample with one seek and one read. That keeps
what the training loop needs from a dataset: a seeded global permutation per epoch, STAR sequences
with no duplicates, equal batch counts on every rank, and exact mid-epoch resume.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from torchvision.datasets.folder import IMG_EXTENSIONS

from .folder import MODES, CorruptImageError, ImageFolder, convert_image

INDEX_NAME = "index.json"
IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)  # what ImageFolder lists, so nothing is lost


def write_shards(root, out, split: str = "train", samples_per_shard: int = 5000, seed: int = 0) -> list[Path]:
    """Pack `root/<split>/<class>/<image>` into `out/<split>/<split>-NNNNNN.tar` plus `index.json`.

    Samples are shuffled (seeded) across shards so that every shard mixes classes; image bytes are
    copied as they are, never re-encoded. Returns the shard paths.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    folder = ImageFolder(root, split)  # checks the layout and lists the samples
    samples = list(folder.samples)
    random.Random(seed).shuffle(samples)
    split_dir = Path(out) / split
    if (split_dir / INDEX_NAME).exists() or any(split_dir.glob("*.tar")):
        raise ValueError(f"{split_dir} already holds shards: write into an empty folder (a mix of two runs' shards "
                         "would not match one index)")
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for first in range(0, len(samples), samples_per_shard):
        path = split_dir / f"{split}-{first // samples_per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, (image_path, label) in enumerate(samples[first:first + samples_per_shard], start=first):
                ext = Path(image_path).suffix.lower().lstrip(".")
                _add_member(tar, f"{key:09d}.{ext}", Path(image_path).read_bytes())
                _add_member(tar, f"{key:09d}.cls", str(label).encode())
        os.replace(tmp, path)  # a shard either exists whole or not at all
        paths.append(path)
    index = {"classes": list(folder.classes), "shards": [_index_shard(p) for p in paths]}
    (split_dir / INDEX_NAME).write_text(json.dumps(index))
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: identical input, identical shard
    tar.addfile(info, io.BytesIO(data))


def _index_shard(path: Path) -> dict:
    """Offsets, sizes and labels of a shard's samples, from its tar headers (no image is read)."""
    images, labels = {}, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext.lower() in IMAGE_EXTENSIONS:
                images[key] = (member.offset_data, member.size)
            elif ext == "cls":
                labels[key] = int(tar.extractfile(member).read())
    unlabelled, imageless = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled or imageless or not images:
        why = (f"samples without a .cls label, e.g. {unlabelled[:3]}" if unlabelled else
               f"labels without an image of a known type ({', '.join(IMAGE_EXTENSIONS)}), e.g. {imageless[:3]}"
               if imageless else "no image members")
        raise ValueError(f"{path} is not a labelled image shard: {why} (expected <key>.jpg + <key>.cls pairs)")
    keys = sorted(images)
    return {"name": path.name, "offsets": [images[k][0] for k in keys], "sizes": [images[k][1] for k in keys],
            "labels": [labels[k] for k in keys]}


def read_index(split_dir) -> dict:
    """`split_dir/index.json`, or an index made by scanning every `*.tar` there (class names are then the
    label numbers)."""
    split_dir = Path(split_dir)
    if (split_dir / INDEX_NAME).is_file():
        return json.loads((split_dir / INDEX_NAME).read_text())
    paths = sorted(split_dir.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no {INDEX_NAME} and no .tar shards in {split_dir} (write them with `star shards`)")
    shards = [_index_shard(p) for p in paths]
    num_classes = 1 + max(max(s["labels"]) for s in shards)
    return {"classes": [str(c) for c in range(num_classes)], "shards": shards}


class ShardDataset(torch.utils.data.Dataset):
    """One split of a shard folder (`root/<split>/*.tar`), returning (transformed image, label) like
    `ImageFolder`. Open files are kept per process, so DataLoader workers each read with their own."""

    def __init__(self, root, split: str = "train", transform=None, in_chans: int = 3):
        if in_chans not in MODES:
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        self.split_dir = Path(root) / split
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"shard split {split!r} not found at {self.split_dir}")
        index = read_index(self.split_dir)
        self.classes = index["classes"]
        self.locations = [(shard["name"], offset, size) for shard in index["shards"]
                          for offset, size in zip(shard["offsets"], shard["sizes"])]
        self.targets = [label for shard in index["shards"] for label in shard["labels"]]
        self.transform, self.mode = transform, MODES[in_chans]
        self._files: dict[str, object] = {}
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.targets)

    def read_bytes(self, index: int) -> bytes:
        name, offset, size = self.locations[index]
        if self._pid != os.getpid():  # forked into a worker: the parent's file offsets are shared, reopen
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            self._files[name] = open(self.split_dir / name, "rb")
        file = self._files[name]
        file.seek(offset)
        return file.read(size)

    def __getitem__(self, index: int):
        try:
            with Image.open(io.BytesIO(self.read_bytes(index))) as img:
                image = convert_image(img, self.mode)
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"cannot decode sample {index} of {self.split_dir}: {err}") from err
        return (self.transform(image) if self.transform else image), self.targets[index]

    def __getstate__(self):  # open files do not travel to spawned workers
        return {**self.__dict__, "_files": {}, "_pid": None}
