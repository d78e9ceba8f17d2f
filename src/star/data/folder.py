"""ImageNet-layout image folders (`root/<split>/<class>/<image>`) with explicit handling of bad files.

Corrupt files are detected lazily, when a sample is loaded, instead of by an up-front scan: verifying
1.28M ImageNet JPEGs before training would take longer than an epoch. With `skip_corrupt=True` a bad
file is replaced by the next good sample in file order (deterministic, whichever worker loads it) and
flagged in a shared-memory tensor, so flags set inside DataLoader worker processes are visible to the
main process: after an epoch, `dataset.num_skipped` / `dataset.skipped_paths` report every bad file met.
Each skip shows that next sample twice in the epoch, possibly twice in one STAR sequence: harmless for a
few bad files among many, which is what skip_corrupt is for; clean a folder with many of them instead.
Evaluation counts every image, so there `skip_corrupt="drop"` returns None for a bad file instead, and
`star.build.eval_loader` leaves it out.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

LAYOUT_HINT = "expected layout: <root>/<split>/<class_name>/<image> (e.g. root/train/n01440764/x.JPEG)"
MODES = {1: "L", 3: "RGB"}


class CorruptImageError(ValueError, OSError):
    """An image file that cannot be opened or decoded."""


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """`img.convert(mode)`, except that 16-bit grayscale (PIL mode "I;16*" or "I") is scaled to 8 bits first:
    PIL's own conversion clips every value above 255 to white."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        values = np.asarray(img, dtype=np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert(mode)


def _hidden(name: str) -> bool:
    """Hidden files and folders (.ipynb_checkpoints, macOS ._x.jpg) are not data."""
    return name.startswith(".")


def _class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not _hidden(entry.name))


def open_image(path) -> Image.Image:
    """Open and fully decode an image file. A broken file, and a decompression bomb (more pixels than PIL's
    `Image.MAX_IMAGE_PIXELS`, which PIL only warns about below twice that), raise `CorruptImageError` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # closes the file, keeps the decoded pixels
                img.load()
            return img
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


def load_image(path, mode: str) -> Image.Image:
    """`open_image`, converted to `mode`."""
    img = open_image(path)
    try:
        return convert_image(img, mode)
    except (OSError, ValueError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


class ImageFolder(torchvision.datasets.ImageFolder):
    """One split of an ImageNet-layout folder, returning (PIL image in "RGB" or "L", int label).

    Class names come from `root/train` when it exists, so every split shares one label mapping even if
    a validation split lacks some class folders; a class folder without images there is an error (it would
    still become a class). `skip_corrupt`: False (a bad file raises), True (replaced by the next good
    sample) or "drop" (None, for evaluation).
    """

    def __init__(self, root, split="train", transform=None, in_chans=3, skip_corrupt=False):
        if in_chans not in MODES:
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        self.dataset_root = Path(root)
        split_dir = self.dataset_root / split
        if not split_dir.is_dir():
            found = sorted(p.name for p in self.dataset_root.iterdir() if p.is_dir()) if self.dataset_root.is_dir() else None
            where = f"{self.dataset_root} has sub-folders {found}" if found is not None else f"{self.dataset_root} does not exist"
            raise FileNotFoundError(f"image folder split {split!r} not found at {split_dir} ({where}); {LAYOUT_HINT}")

        def is_image(path: str) -> bool:
            visible = not any(_hidden(part) for part in Path(path).relative_to(split_dir).parts)
            return visible and path.lower().endswith(IMG_EXTENSIONS)

        super().__init__(split_dir, transform=transform, is_valid_file=is_image, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(
                f"no images found under {split_dir} (extensions {', '.join(IMG_EXTENSIONS)}); {LAYOUT_HINT}"
            )
        present = set(self.targets)
        empty = [name for index, name in enumerate(self.classes) if index not in present]
        if empty and split_dir == self._class_root(split_dir):
            raise ValueError(f"class folders without images under {split_dir}: {empty[:10]}; add images or remove "
                             "them (each would still become a class that nothing trains)")
        self.split = split
        self.mode = MODES[in_chans]
        self.skip_corrupt = skip_corrupt
        self._corrupt = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def _class_root(self, split_dir: Path) -> Path:
        """Where class names come from: `root/train` if it exists, else the split itself."""
        return self.dataset_root / "train" if (self.dataset_root / "train").is_dir() else split_dir

    def find_classes(self, directory):
        class_root = self._class_root(Path(directory))
        classes = _class_folders(class_root)
        if not classes:
            raise FileNotFoundError(f"no class folders in {class_root}; {LAYOUT_HINT}")
        unknown = sorted(set(_class_folders(Path(directory))) - set(classes))
        if unknown:
            raise ValueError(f"{directory} has class folders missing from {class_root}: {unknown[:10]}")
        return classes, {name: index for index, name in enumerate(classes)}

    @property
    def skipped_paths(self) -> list[str]:
        return [self.samples[i][0] for i in self._corrupt.nonzero().flatten().tolist()]

    @property
    def num_skipped(self) -> int:
        return int(self._corrupt.sum())

    def __getitem__(self, index):
        if not self.skip_corrupt:
            return self._sample(index)
        if self.skip_corrupt == "drop":
            try:
                return self._sample(index)
            except CorruptImageError:
                self._corrupt[index] = True
                return None
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if self._corrupt[candidate]:
                continue
            try:
                return self._sample(candidate)
            except CorruptImageError:
                self._corrupt[candidate] = True
        raise CorruptImageError(f"every image under {self.root} is corrupt")

    def _sample(self, index):
        path, target = self.samples[index]
        img = load_image(path, self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target
