"""Where a number was measured: star's commit, the library versions and the device. Every run directory
gets an `environment.json` from it, and the benchmarks and experiments stamp their results with it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

import star

PACKAGE_DIR = Path(star.__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """star's commit: `$STAR_COMMIT` if set (a tree copied without its .git, as onto the device machine),
    else the checkout star is imported from, with "-dirty" for uncommitted changes to tracked files, else
    "unknown" (an installed wheel, or a git repository that merely contains the install)."""
    if os.environ.get("STAR_COMMIT"):
        return os.environ["STAR_COMMIT"]
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() / "src" / "star" != PACKAGE_DIR:
        return "unknown"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")  # no index refresh
    return commit + ("-dirty" if dirty else "")


def device_name(device: Optional[torch.device] = None) -> str:
    """The card's name on CUDA, else the CPU's architecture."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def environment(device: Optional[torch.device] = None) -> dict:
    """star version and commit, torch (and Triton, if installed) versions, and the device."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"star": star.__version__, "commit": git_commit(), "torch": torch.__version__, "triton": triton_version,
            "device": device_name(device)}
