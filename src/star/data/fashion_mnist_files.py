"""Where Fashion-MNIST's four IDX files are, with nothing but the standard library, so that
`python3 src/star/data/fashion_mnist_files.py` can check for the data before any set-up (scripts/demo.sh):
it prints the folder, or where it looked and how to get the files, and exits 1."""

import os
import sys
from pathlib import Path

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's `dataset-fashion-mnist` package
# where `star download fashion-mnist` puts the files by default (searched last)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "star" / "fashion-mnist"
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/star/data/x.py -> repo root


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(folder: Path) -> bool:
    return all(_file_in(folder, name) for files in SPLIT_FILES.values() for name in files)


def _candidate_dirs(root) -> list[Path]:
    """Every folder searched, in priority order."""
    if root is not None:
        return [Path(root)]
    dirs = []
    if os.environ.get("STAR_DATA"):
        star_data = Path(os.environ["STAR_DATA"])
        dirs += [star_data, star_data / "fashion-mnist"]
    shared = Path("..") / "shared" / "data" / "fashion-mnist"
    dirs += [(_REPO_ROOT / shared).resolve(), (Path.cwd() / shared).resolve(), SYSTEM_DIR, CACHE_DIR]
    return list(dict.fromkeys(dirs))  # the repo root is often the working directory: list each place once


def find_fashion_mnist(root=None) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files (gz or uncompressed).

    Search order: `root` if given (and nothing else); `$STAR_DATA` or `$STAR_DATA/fashion-mnist`;
    `../shared/data/fashion-mnist` next to the repo root, then next to the working directory;
    `/usr/share/datasets/fashion-mnist`.
    """
    searched = _candidate_dirs(root)
    for folder in searched:
        if _has_all_files(folder):
            return folder
    needed = ", ".join(f"{name}[.gz]" for files in SPLIT_FILES.values() for name in files)
    looked = "\n".join(f"  - {folder}" for folder in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST not found. A folder must hold {needed}. Looked in:\n{looked}\n"
        "Get the data with `apt-get install dataset-fashion-mnist` (installs into "
        f"{SYSTEM_DIR}), or `star download fashion-mnist` (torchvision's download, needs a network; into "
        f"{CACHE_DIR}), or put the files in a folder and set STAR_DATA=/path/to/folder."
    )


if __name__ == "__main__":
    try:
        print(find_fashion_mnist())
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
