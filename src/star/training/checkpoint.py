"""Crash-safe checkpoints.

Layout of a run directory:
    checkpoints/step-00001000/model.safetensors   model weights (shareable, no pickle)
    checkpoints/step-00001000/state.pt            optimizer, EMA, RNG, data position, step, config
    checkpoints/latest                            name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a kill at any moment leaves either the old or the new
checkpoint, never a half-written one. A step saved again (a rerun past it) moves the old copy
aside before the new one takes its name, and `clean_interrupted_saves` puts it back if a kill came
in between; old checkpoints are pruned by renaming them to temporary names first, so a kill while
deleting never leaves a partial `step-*` dir. `state.pt` holds only tensors and plain Python
values, so it loads with `torch.load(weights_only=True)`.

For the fault tests, `STAR_FAULT_INJECT=POINT[@N]` SIGKILLs the process the N-th time (default 1)
a save reaches POINT, one of `FAULT_POINTS`.
"""

from __future__ import annotations

import collections
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from star.models.hub import load_state_dict_checked

PathLike = Union[str, Path]
WEIGHTS_NAME, STATE_NAME, LATEST_NAME = "model.safetensors", "state.pt", "latest"
LOCK_NAME = ".lock"
REPLACED_SUFFIX = ".replaced"  # a step's previous copy while its new one is renamed into place
FAULT_POINTS = ("weights-written", "state-written", "old-moved-aside", "renamed", "latest-written", "pruning")
_fault_hits: collections.Counter = collections.Counter()
_held_locks: weakref.WeakSet = weakref.WeakSet()  # the lock files `lock_run_dir` opened in this process


def _close_inherited_locks() -> None:
    """In a forked child (a data-loader worker): close the lock files inherited from the run, so that the lock
    ends with the run's process, not seconds later with its orphaned workers."""
    for lock in list(_held_locks):
        lock.close()


os.register_at_fork(after_in_child=_close_inherited_locks)


class CheckpointError(ValueError, OSError):
    """A checkpoint file that cannot be read, or a checkpoint that cannot be written."""


def _fault_point(name: str) -> None:
    """Test hook (see the module docstring): die here, as `kill -9` would, if STAR_FAULT_INJECT says so."""
    point, _, nth = os.environ.get("STAR_FAULT_INJECT", "").partition("@")
    if point == name:
        _fault_hits[name] += 1
        if _fault_hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


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


def _write_failed(path: Path, err: Exception, previous: Optional[Path]) -> CheckpointError:
    """One line for a failed write: torch reports a full disk as "[enforce fail at inline_container.cc] ...
    unexpected pos", so the free space is given instead of its text."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else "the write failed"
    free = shutil.disk_usage(path.parent.parent).free
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointError(f"cannot write checkpoint file {path}: {reason} ({free / 2**20:.1f} MiB free on its "
                           f"disk); {kept}")


def save_checkpoint(run_dir: PathLike, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `checkpoints/step-{step}` (weights + `state`), point `latest` at it, prune old ones.

    `keep_last` > 0 keeps that many newest checkpoints; 0 keeps all. A failed write raises
    `CheckpointError` naming the file and leaves every earlier checkpoint as it was.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        # clone so tensors that share storage (views, tied weights) save as separate entries
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        writers = ((WEIGHTS_NAME, "weights-written", lambda p: save_file(weights, str(p))),
                   (STATE_NAME, "state-written", lambda p: torch.save(state, p)))
        for name, point, write in writers:
            try:
                write(tmp / name)
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:
                raise _write_failed(final / name, err, latest_checkpoint(run_dir)) from None
            _fault_point(point)
        aside = ckpt_root / f".{final.name}{REPLACED_SUFFIX}"
        if final.exists():  # re-saving a step after resuming from an earlier one: keep the old copy until the end
            os.replace(final, aside)
            _fault_point("old-moved-aside")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_root)
    _fault_point("renamed")
    atomic_write(ckpt_root / LATEST_NAME, lambda p: p.write_text(final.name + "\n"))
    _fault_point("latest-written")
    if aside.exists():
        shutil.rmtree(aside)
    if keep_last > 0:
        for old in sorted(ckpt_root.glob("step-*"))[:-keep_last]:
            if old != final:
                doomed = ckpt_root / f".{old.name}.pruned.tmp"
                os.replace(old, doomed)  # from here on it is a temp dir: a kill mid-delete leaves no partial step
                _fault_point("pruning")
                shutil.rmtree(doomed)
    return final


def clean_interrupted_saves(run_dir: PathLike) -> list[Path]:
    """Undo what a kill in the middle of `save_checkpoint` or `atomic_write` left in `run_dir`: temp files and
    dirs are removed, and a step's old copy that was moved aside goes back if its new copy never took its
    place. Call it only while holding the run's lock (`lock_run_dir`). Returns the paths removed."""
    run_dir, removed = Path(run_dir), []
    ckpt_root = run_dir / "checkpoints"
    for aside in sorted(ckpt_root.glob(f".step-*{REPLACED_SUFFIX}")):
        final = ckpt_root / aside.name[1:-len(REPLACED_SUFFIX)]
        if final.exists():
            shutil.rmtree(aside)
            removed.append(aside)
        else:
            os.replace(aside, final)
    for tmp in sorted([*ckpt_root.glob(".*.tmp"), *run_dir.glob(".*.tmp")]):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        removed.append(tmp)
    return removed


def lock_run_dir(run_dir: PathLike):
    """Hold an exclusive lock on `run_dir` (created if missing) for as long as the returned file stays open,
    so two runs never write one directory; a second one fails at once, naming the directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ValueError(f"{run_dir} is in use by another star run ({holder}); wait for it to end, "
                         "or choose another --output_dir") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    _held_locks.add(lock)
    return lock


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The checkpoint `latest` points to in `run_dir`, or None if there is none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST_NAME
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def step_checkpoints(run_dir: PathLike) -> list[Path]:
    """Every `step-*` checkpoint dir of `run_dir`, newest first."""
    return sorted((p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir()), reverse=True)


def resolve_checkpoint(path: PathLike) -> Path:
    """Accept a run dir, its `checkpoints/` dir, or a checkpoint dir; return the checkpoint dir."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    for run_dir in (path, path.parent):
        if (ckpt := latest_checkpoint(run_dir)) is not None and (ckpt / WEIGHTS_NAME).is_file():
            return ckpt
    raise FileNotFoundError(f"no checkpoint at {path} (expected a run dir with checkpoints/latest, or a dir with {WEIGHTS_NAME})")


def read_checkpoint(ckpt: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and training state of checkpoint dir `ckpt`; `CheckpointError` names a missing, truncated
    or garbled file (instead of torch's advice to unpickle it unsafely)."""
    ckpt = Path(ckpt)
    readers = ((WEIGHTS_NAME, lambda p: load_file(str(p))),
               (STATE_NAME, lambda p: torch.load(p, map_location="cpu", weights_only=True)))
    out = []
    for name, read in readers:
        try:
            out.append(read(ckpt / name))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {ckpt / name} is missing") from None
        except Exception as err:  # safetensors, zip and unpickling errors alike: the file is not what was saved
            raise CheckpointError(f"checkpoint file {ckpt / name} is unreadable (truncated or corrupt: "
                                  f"{type(err).__name__})") from None
    weights, state = out
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {ckpt / STATE_NAME} holds a {type(state).__name__}, not a training state")
    return weights, state


def find_resumable(run_dir: PathLike) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint of `run_dir` as (dir, weights, state): the one `latest` names, else (with a
    warning naming what was wrong) the newest intact `step-*` dir; None if the run has no checkpoint at all.
    Raises `CheckpointError` if it has some but none is readable."""
    pointed = latest_checkpoint(run_dir)
    candidates = ([pointed] if pointed is not None and pointed.is_dir() else []) + step_checkpoints(run_dir)
    if not candidates:
        return None
    problems = []
    if pointed is None:
        problems.append(f"{Path(run_dir) / 'checkpoints' / LATEST_NAME} is missing")
    elif not pointed.is_dir():
        problems.append(f"{pointed} (named by {LATEST_NAME}) is missing")
    for ckpt in dict.fromkeys(candidates):
        try:
            weights, state = read_checkpoint(ckpt)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            print(f"warning: {problem}; resuming from {ckpt}", file=sys.stderr)
        return ckpt, weights, state
    raise CheckpointError(f"no readable checkpoint in {Path(run_dir) / 'checkpoints'}: " + "; ".join(problems))


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
    weights, state = read_checkpoint(ckpt)
    load_state_dict_checked(model, weights, str(ckpt))
    return state
