"""Synthetic, class-structured images for smoke tests and CI: no download, deterministic, learnable.

Each class is a sinusoidal stripe pattern with its own orientation (and, for RGB, its own colour);
samples vary by phase, a small orientation jitter and pixel noise, so a tiny model can separate the
classes within a few steps while memorising single pixels does not work.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .folder import MODES


def render_image(label: int, num_classes: int, img_size: int, in_chans: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of class `label` using randomness from `rng` only."""
    coords = np.linspace(-0.5, 0.5, img_size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = np.pi * label / num_classes + rng.normal(0.0, 0.03)
    cycles = 3.0 + label % 3  # stripes per image: a second cue when many classes crowd the angles
    phase = rng.uniform(0.0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    if in_chans == 3:
        colour = 0.55 + 0.45 * np.cos(2 * np.pi * (label / num_classes + np.array([0.0, 1 / 3, 2 / 3])))
        pixels = stripes[..., None] * colour
    else:
        pixels = stripes
    pixels = pixels + rng.normal(0.0, 0.08, size=pixels.shape)
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8))


class SyntheticImages(Dataset):
    """`num_samples` class-balanced images returned as (PIL image, int label), like the real datasets.

    Sample `i` depends only on (seed, stream, i): the same arguments give the same images in any order
    or worker. `stream` gives independent sets for one seed (build_dataset uses 0 = train, 1 = val).
    """

    def __init__(self, num_samples, img_size, in_chans, num_classes, seed=0, transform=None, stream=0):
        if in_chans not in MODES:
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        if num_classes < 2 or num_samples < 1 or img_size < 1:
            raise ValueError(
                f"need num_classes >= 2, num_samples >= 1, img_size >= 1; "
                f"got {num_classes}, {num_samples}, {img_size}"
            )
        self.img_size, self.in_chans, self.seed, self.stream = img_size, in_chans, seed, stream
        self.transform = transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
        labels = np.arange(num_samples) % num_classes
        self.targets = np.random.default_rng([seed, stream]).permutation(labels).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, self.stream, index])
        img = render_image(label, len(self.classes), self.img_size, self.in_chans, rng)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def write_image_folder(root, num_per_class, classes, img_size, in_chans=3, seed=0, splits=("train", "val")) -> Path:
    """Write an ImageNet-layout folder of synthetic JPEGs: root/<split>/<class>/<nnnnn>.jpg.

    `classes` is a list of class names or a number of classes (named class_0, class_1, ...).
    """
    names = [f"class_{c}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    root = Path(root)
    for split_index, split in enumerate(splits):
        for label, name in enumerate(names):
            class_dir = root / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(num_per_class):
                rng = np.random.default_rng([seed, split_index, label, i])
                img = render_image(label, len(names), img_size, in_chans, rng)
                img.save(class_dir / f"{i:05d}.jpg", quality=95)
    return root
