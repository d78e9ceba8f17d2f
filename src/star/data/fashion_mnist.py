"""Fashion-MNIST: finding the files on disk and serving them as PIL images.

The four IDX files are read with gzip + numpy rather than torchvision's MNIST reader: torchvision's
`read_image_file` only opens uncompressed files, so using it would mean decompressing into a cache
directory (extra disk, atomic-write and staleness handling) to save ~10 lines of header parsing.
The whole split is loaded into memory once (60k x 28 x 28 uint8 = 47 MB) and shared by reference.
"""

import functools
import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .fashion_mnist_files import CACHE_DIR, SPLIT_FILES, _file_in, find_fashion_mnist

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: magic (0x0000 08 ndim), ndim big-endian int32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    broken = f"{path} is truncated or corrupt; download it again"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{broken} ({err})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{broken}: not an IDX file of uint8 values (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != np.prod(shape):
        raise ValueError(f"{broken}: its header says {shape}, it holds {array.size} values")
    return array.reshape(shape)


@functools.lru_cache(maxsize=2)
def _load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cached so that building train and eval datasets (or several in tests) decodes each file once."""
    image_name, label_name = SPLIT_FILES[split]
    images = _read_idx(_file_in(folder, image_name))
    labels = _read_idx(_file_in(folder, label_name))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST split returning (PIL image, int label); mode "L", or "RGB" when in_chans=3."""

    def __init__(self, root=None, split="train", transform=None, in_chans=1):
        if split not in SPLIT_FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        self.root = find_fashion_mnist(root)
        self.split = split
        self.transform = transform
        self.in_chans = in_chans
        self.classes = list(CLASSES)
        self.images, labels = _load_split(self.root, split)
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        if self.in_chans == 3:
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self):
        return f"FashionMNIST(split={self.split!r}, num_samples={len(self)}, root='{self.root}')"


def download_fashion_mnist(folder=None) -> Path:
    """Fetch the four IDX files with torchvision's downloader into `folder` (default: the cache folder that
    `find_fashion_mnist` searches) and return it. Needs a network."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    folder = Path(folder) if folder is not None else CACHE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for train in (True, False):
                TorchvisionFashionMNIST(tmp, train=train, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError too
            why = " ".join(str(err).split())  # torchvision's message spans lines
            raise ValueError(f"could not download Fashion-MNIST ({why}); without a network, install "
                             f"dataset-fashion-mnist (Debian) or copy the files and set STAR_DATA") from None
        raw = Path(tmp) / "FashionMNIST" / "raw"
        folder.mkdir(parents=True, exist_ok=True)
        for name in (n for files in SPLIT_FILES.values() for n in files):
            shutil.copyfile(_file_in(raw, name), folder / _file_in(raw, name).name)
    return find_fashion_mnist(folder)
