"""Crash-safe checkpoints.

Layout of a run directory:
    checkpoints/step-00001000/model.safetensors   model weights (shareable, no pickle)
    checkpoints/step-00001000/state.pt            optimizer, EMA, RNG, data position, step, config
    checkpoints/latest                            name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a kill at any moment leaves either the old or the new
checkpoint, never a half-written one. `state.pt` holds only tensors and plain Python values,
so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from star.models.hub import load_state_dict_checked

PathLike = Union[str, Path]
WEIGHTS_NAME, STATE_NAME, LATEST_NAME = "model.safetensors", "state.pt", "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temp file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: PathLike, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `checkpoints/step-{step}` (weights + `state`), point `latest` at it, prune old ones.

    `keep_last` > 0 keeps that many newest checkpoints; 0 keeps all.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        # clone so tensors that share storage (views, tied weights) save as separate entries
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        for name, write in ((WEIGHTS_NAME, lambda p: save_file(weights, str(p))), (STATE_NAME, lambda p: torch.save(state, p))):
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving a step after a resume: the old copy is superseded
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_root)
    atomic_write(ckpt_root / LATEST_NAME, lambda p: p.write_text(final.name + "\n"))
    if keep_last > 0:
        for old in sorted(ckpt_root.glob("step-*"))[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The checkpoint `latest` points to in `run_dir`, or None if there is none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST_NAME
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def resolve_checkpoint(path: PathLike) -> Path:
    """Accept a run dir, its `checkpoints/` dir, or a checkpoint dir; return the checkpoint dir."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    for run_dir in (path, path.parent):
        if (ckpt := latest_checkpoint(run_dir)) is not None and (ckpt / WEIGHTS_NAME).is_file():
            return ckpt
    raise FileNotFoundError(f"no checkpoint at {path} (expected a run dir with checkpoints/latest, or a dir with {WEIGHTS_NAME})")


def load_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Model weights (on CPU) from a .safetensors file, a checkpoint dir, or a run dir."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    return load_file(str(resolve_checkpoint(path) / WEIGHTS_NAME))


def load_checkpoint(path: PathLike, model: nn.Module) -> dict[str, Any]:
    """Load weights from checkpoint `path` (see `resolve_checkpoint`) into `model` and return
    its training state (the dict given to `save_checkpoint`)."""
    ckpt = resolve_checkpoint(path)
    load_state_dict_checked(model, load_file(str(ckpt / WEIGHTS_NAME)), str(ckpt))
    return torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
