"""One training engine for pretraining, fine-tuning and linear probing (MAE-style loop).

`Trainer(cfg, model, loss_fn, train_loader, val_loader).fit()` runs a whole job: AdamW with
per-step warmup + cosine lr, gradient accumulation, grad clipping, bf16 autocast on CUDA,
optional EMA, evaluation, metrics (tqdm, `metrics.csv`, TensorBoard) and checkpoints. There is no
GradScaler: bf16 has fp32's exponent range, so gradients need no loss scaling (fp16 is not offered).

Resuming is exact: a checkpoint holds the weights, optimizer, EMA, step, the position inside the
epoch and all RNG states, and the RNG is restored after the data iterator is created, so a
resumed run retraces the uninterrupted one (bit-exact on CPU, with or without data-loader workers for
loaders from `star.data.build_sequence_loader`, which seed every sample; with other loaders' workers,
augmentation randomness is only as reproducible as the dataset's own seeding).

Under torchrun/SLURM (see `star.training.distributed`) the model is wrapped in DDP or sharded with
FSDP2 (`cfg.distributed`), every rank draws from its own seed, logged losses are global-batch
means, and rank 0 writes full checkpoints that resume on any number of ranks: the data position is
kept in sequences, each rank's RNG is kept too (a rank new to the run is seeded from its rank).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from star.config import CUDA_GRAPH_MODES, TrainConfig, check_config, config_to_dict, save_config
from star.models.hub import load_state_dict_checked
from star.training.checkpoint import (atomic_write, clean_interrupted_saves, find_resumable, latest_checkpoint,
                                      lock_run_dir, read_checkpoint, resolve_checkpoint, save_checkpoint,
                                      step_checkpoints)
from star.training.distributed import (all_gather_objects, full_model_state_dict, is_sharded, load_full_model_state_dict,
                                       load_optimizer_state_by_name, optimizer_state_by_name, wrap_model)
from star.training.optim import create_optimizer, freeze_for_linear_probe
from star.training.provenance import environment
from star.training.schedule import CosineSchedule, resolve_lr

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]
# A parameter beyond this has diverged: trained weights of these models stay within a few units (the largest,
# Mamba's A_log, is log(d_state)), and AdamW moves a weight by about lr per step.
MAX_WEIGHT = 1e6


# ---------------------------------------------------------------------------- runtime helpers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    if device == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 on CUDA for "auto", None (full fp32) on CPU for "auto"."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every RNG the training step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():  # a resumed run may see fewer GPUs than the one that saved
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _num_images(batch) -> int:
    """Images in a batch: B*K for pretraining sequences (B, K, C, H, W), else B."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x.shape[0] * x.shape[1] if x.ndim == 5 else x.shape[0]


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", amp_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of a classifier over (images, labels) batches; a None
    batch (only unreadable images, see `star.build.eval_loader`) counts nothing."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        images, targets = _to_device(images, device), _to_device(targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), topk[:, 0].sum(),
                               topk.any(dim=1).sum(), torch.tensor(targets.shape[0], device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


# ---------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Appends metric rows to `metrics.csv` (columns grow as new metrics appear) and TensorBoard.

    On resume, rows logged after the checkpoint's step (by a run that died later) are dropped so
    the file reads as one uninterrupted run; a row cut short by a kill is dropped too. The file is
    only ever appended to or replaced whole (`atomic_write`), so a kill never leaves it emptied.
    """

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None):
        self.path = run_dir / "metrics.csv"
        self.fields, self.rows = ["step"], []
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # the row being appended when the run died
            reader = csv.DictReader(lines)
            self.fields = list(reader.fieldnames or ["step"])
            self.rows = [r for r in reader if int(r["step"]) <= resume_step]
        self._rewrite()
        purge = 0 if resume_step is None else resume_step + 1  # a fresh start drops a dead run's events too
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a bare GPU image may lack it: keep the CSV
            print("tensorboard is not installed: metrics go to metrics.csv only")
            self.tb = None
        else:
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def _rewrite(self) -> None:
        def write(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: repr(float(v)) for k, v in metrics.items()}}
        self.rows.append(row)
        if any(k not in self.fields for k in row):
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------- trainer


class Trainer:
    """Trains `model` with `loss_fn(model, batch) -> (loss, logs)` as `cfg` says.

    `train_loader` yields a fixed number of batches per epoch (`len(loader)`). Its batch sampler
    (e.g. `star.data.StarBatchSampler`, K=1 for classification) should have `set_epoch(epoch)`,
    `state_dict(batches_done=n)` and `load_state_dict(state)`, the last making the next iter() start
    at batch n of the saved epoch; without them resuming mid-epoch draws and discards the batches
    already consumed (correct, but slow). `val_loader`, for classification tasks, yields (images, labels).
    For `task == "linprobe"` everything but `model.head` is frozen here.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, train_loader, val_loader=None):
        check_config(cfg)
        self.cfg, self.loss_fn = cfg, loss_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.rank, self.world_size = _dist_rank_world()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.run_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed + self.rank)

        if cfg.task == "linprobe":
            freeze_for_linear_probe(model)
        self.model = model.to(self.device)
        self.train_model = self.model  # what the loss sees: wrapped for DDP / compiled
        if self.world_size > 1:
            if cfg.distributed == "fsdp" and cfg.optim.ema_decay is not None:
                raise ValueError("optim.ema_decay (model EMA) is not supported with distributed=fsdp; use ddp")
            self.train_model = wrap_model(self.model, self.device, cfg.distributed)
        self.cuda_graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES
        if self.cuda_graphs and self.world_size > 1:
            raise ValueError(f"--compile_mode {cfg.compile_mode} (CUDA graphs) is not supported with multi-GPU "
                             "runs; use --compile_mode default or max-autotune-no-cudagraphs")
        if cfg.compile:
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            self.train_model = torch.compile(self.train_model, mode=mode)

        optim = cfg.optim
        self.steps_per_epoch = len(train_loader) // optim.accum_iter
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train loader has {len(train_loader)} batches per epoch, fewer than accum_iter={optim.accum_iter}")
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.lr = resolve_lr(optim, self.world_size)
        self.optimizer = create_optimizer(self.model, optim, self.lr)
        self.schedule = CosineSchedule(self.optimizer, self.lr, optim.min_lr, optim.warmup_epochs * self.steps_per_epoch, self.total_steps)
        self.ema = ModelEmaV3(self.model, decay=optim.ema_decay) if optim.ema_decay is not None else None

        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch
        self.batches_done = 0  # micro-batches of the current epoch consumed
        self.last_checkpoint: Optional[Path] = None
        self._saved_step: Optional[int] = None  # the step last_checkpoint holds: a step is saved once
        self._rng_to_restore: Optional[dict] = None
        self._sampler_to_restore: Optional[dict] = None
        self.metrics, self._lock = None, None
        if self.is_main:  # the only writer of run_dir, from here to close()
            self._lock = lock_run_dir(self.run_dir)
        try:
            if self.is_main:
                clean_interrupted_saves(self.run_dir)
            if self.world_size > 1:  # the other ranks read checkpoints only once rank 0 has tidied them
                dist.barrier()
            if cfg.resume is not None:
                self.resume(cfg.resume)
            elif found := (latest_checkpoint(self.run_dir) or next(iter(step_checkpoints(self.run_dir)), None)):
                raise ValueError(f"{self.run_dir} already holds checkpoints (latest: {found}); "
                                 "pass --resume auto to continue that run, or choose another --output_dir")
            if self.is_main:  # only once the start is accepted: a refused resume leaves the run's records alone
                save_config(cfg, self.run_dir / "config.yaml")
                self._record_environment()
                self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if self.last_checkpoint else None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory for another run (at the end of the job, or when it fails)."""
        if self.metrics is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _record_environment(self) -> None:
        """Append where this start of the run happens to `environment.json`: a resumed run (maybe on another
        machine or number of GPUs) keeps the record of its earlier starts."""
        path = self.run_dir / "environment.json"
        starts = json.loads(path.read_text()) if self.last_checkpoint is not None and path.exists() else []
        starts.append({**environment(self.device), "world_size": self.world_size, "from_step": self.step})
        atomic_write(path, lambda p: p.write_text(json.dumps(starts, indent=1) + "\n"))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Training state besides the weights; a collective, so every rank calls it."""
        rank_rngs = all_gather_objects(get_rng_state())
        return {
            "step": self.step,
            "data": {"epoch": self.epoch, "batches_done": self.batches_done, "sampler": self._sampler_state()},
            "optimizer": optimizer_state_by_name(self.model, self.optimizer),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rank_rngs[0],
            "rank_rngs": rank_rngs,
            "config": config_to_dict(self.cfg),
        }

    def save(self) -> None:
        """Write a checkpoint (rank 0) unless this step already has one; every rank must call this, as it
        gathers state from all."""
        if self._saved_step == self.step:
            return
        self._check_weights()
        weights = _StateDictView(full_model_state_dict(self.model)) if is_sharded(self.model) else self.model
        state = self.state_dict()
        if self.is_main:
            self.last_checkpoint = save_checkpoint(self.run_dir, self.step, weights, state, self.cfg.keep_last)
        self._saved_step = self.step

    def _check_weights(self) -> None:
        """The loss is checked before each update, so the last update's result is checked here, before it is
        saved: every parameter finite and below `MAX_WEIGHT` (on every rank, so all stop together)."""
        named = [(n, p.detach()) for n, p in self.model.named_parameters()]
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]  # FSDP: this rank's shard
        peaks = torch.stack([p.abs().amax() if p.numel() else p.new_zeros(()) for p in local]).float()
        if self.world_size > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        bad = [(name, peak) for (name, _), peak in zip(named, peaks.tolist()) if not peak <= MAX_WEIGHT]
        if bad:
            name, peak = bad[0]
            raise FloatingPointError(
                f"training diverged by optimizer step {self.step}: parameter {name} reaches |w| = {peak:.3g} "
                f"({len(bad)} parameters beyond {MAX_WEIGHT:.0e} or not finite); not saved. Last good checkpoint: "
                f"{self.last_checkpoint or 'none saved yet'} (lower --optim.lr / --optim.blr, or set --optim.clip_grad)")

    def resume(self, path: str) -> None:
        """Continue from checkpoint `path`: "auto" or a run dir = that run's newest readable checkpoint (the one
        `latest` names, else an older one, with a warning), "auto" starting fresh if there is none; a
        checkpoint dir = exactly that one."""
        run_dir = self.run_dir if path == "auto" else Path(path)
        if path == "auto" or (run_dir / "checkpoints").is_dir():
            found = find_resumable(run_dir)
            if found is None:
                if path == "auto":
                    if self.is_main:
                        print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
                    return
                raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
            ckpt, weights, state = found
        else:
            ckpt = resolve_checkpoint(path)
            weights, state = read_checkpoint(ckpt)
        if is_sharded(self.model):
            load_full_model_state_dict(self.model, weights)
        else:
            load_state_dict_checked(self.model, weights, str(ckpt))
        self._check_resumable(ckpt, state)
        sampler = getattr(self.train_loader, "batch_sampler", None)
        if state["data"]["sampler"] is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(state["data"]["sampler"])  # refuses another data order now, not after a start
        # the checkpoint's group hyperparameters give way to this config's (the lr is set by the schedule)
        fresh = [{k: g[k] for k in ("weight_decay", "betas", "lr_scale") if k in g}
                 for g in self.optimizer.param_groups]
        load_optimizer_state_by_name(self.model, self.optimizer, state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{ckpt} has no EMA weights but optim.ema_decay is set")
            self.ema.module.load_state_dict(state["ema"])
        self.step = state["step"]
        self.epoch, self.batches_done = state["data"]["epoch"], state["data"]["batches_done"]
        self._sampler_to_restore = state["data"]["sampler"]
        rank_rngs = state.get("rank_rngs") or [state["rng"]]
        if len(rank_rngs) == self.world_size or self.rank == 0:
            self._rng_to_restore = rank_rngs[self.rank]
        else:  # a rank the saved run did not have: its own stream, distinct from every other rank's
            seed_everything(self.cfg.seed + self.rank + 1_000_003 * self.step)
        self.last_checkpoint, self._saved_step = ckpt, self.step
        if self.is_main:
            print(f"resumed from {ckpt}: step {self.step}, epoch {self.epoch}, batch {self.batches_done}")

    def _check_resumable(self, ckpt: Path, state: dict) -> None:
        """The step count, schedule and data position of a checkpoint mean the same only for the same task
        and global batch (batch_size x accum_iter x processes; how it splits over them may change)."""
        saved = state.get("config")
        if saved is None:
            return
        if saved["task"] != self.cfg.task:
            raise ValueError(f"{ckpt} is a {saved['task']} checkpoint; it cannot resume a {self.cfg.task} run")
        o, world = saved["optim"], len(state.get("rank_rngs") or [state["rng"]])
        before = o["batch_size"] * o["accum_iter"] * world
        now = self.cfg.optim.batch_size * self.cfg.optim.accum_iter * self.world_size
        if before != now:
            raise ValueError(
                f"{ckpt} was trained with a global batch of {before} images (batch_size {o['batch_size']} x "
                f"accum_iter {o['accum_iter']} x {world} processes); this run's is {now}, so its step count, "
                "schedule and data position would not line up. Resume with the same global batch (e.g. raise "
                "--optim.accum_iter on fewer GPUs), or start a new run from its weights with --pretrained")

    # ------------------------------------------------------------------ loop

    def _done(self) -> bool:
        return self.step >= self.total_steps or (self.cfg.max_steps is not None and self.step >= self.cfg.max_steps)

    def fit(self) -> dict[str, float]:
        """Train to the end of the schedule (or `max_steps`); returns the last evaluation, if any."""
        results: dict[str, float] = {}
        if self._done() and self.is_main:
            print(f"nothing to train: the run is at step {self.step} of {self.total_steps}"
                  + (f" (max_steps {self.cfg.max_steps})" if self.cfg.max_steps is not None else ""))
        try:
            while not self._done():
                self.train_one_epoch()
                epoch_end = self.batches_done == 0
                final = self._done()
                every = self.cfg.eval_every
                if final or (epoch_end and every > 0 and self.epoch % every == 0):
                    results = self.evaluate_all()
                if final or (epoch_end and self.cfg.save_every >= 0):
                    self.save()
        except BaseException:
            self.close()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return results

    def evaluate_all(self) -> dict[str, float]:
        """Evaluate the model (and its EMA) on `val_loader`; leaves every RNG untouched so that
        evaluating never changes the training trajectory."""
        if self.val_loader is None or self.cfg.task == "pretrain":
            return {}
        rng = get_rng_state()
        results = {f"val/{k}": v for k, v in evaluate(self.train_model, self.val_loader, self.device, self.amp_dtype).items()}
        if self.ema is not None:
            results.update({f"val_ema/{k}": v for k, v in evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype).items()})
        set_rng_state(rng)
        if self.is_main:
            epoch = self.epoch + self.batches_done / (self.steps_per_epoch * self.cfg.optim.accum_iter)
            self.metrics.log(self.step, {"epoch": epoch, **results})
            print(f"epoch {self.epoch} step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    def _sampler_state(self) -> Optional[dict]:
        sampler = getattr(self.train_loader, "batch_sampler", None)
        return sampler.state_dict(batches_done=self.batches_done) if hasattr(sampler, "state_dict") else None

    def _start_epoch_iterator(self):
        sampler = getattr(self.train_loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip = self.batches_done
        if skip and self._sampler_to_restore is not None:
            sampler.load_state_dict(self._sampler_to_restore)
            self.batches_done, skip = sampler.state_dict()["batches_done"], 0  # in this run's batches (world size)
        self._sampler_to_restore = None
        # Creating the iterator draws from the RNG. A checkpoint from an epoch's end was saved before that
        # epoch's iterator existed, so the RNG is restored first; one from mid-epoch after it, so after.
        if self._rng_to_restore is not None and self.batches_done == 0:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        it = iter(self.train_loader)
        for _ in range(skip):
            next(it)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        return it

    def train_one_epoch(self) -> None:
        """Run optimizer steps until the epoch ends or training is done; resumes mid-epoch."""
        cfg, accum = self.cfg, self.cfg.optim.accum_iter
        num_batches = self.steps_per_epoch * accum  # a trailing partial accumulation is dropped
        it = self._start_epoch_iterator()
        self.train_model.train()
        quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")  # tqdm's own switch, for log files
        bar = tqdm(total=num_batches, initial=self.batches_done, desc=f"{cfg.task} epoch {self.epoch}",
                   disable=not self.is_main or quiet, dynamic_ncols=True)
        images, t_last = 0, time.perf_counter()
        try:
            while not self._done():
                losses, logs = [], {}
                for micro in range(accum):
                    batch = _to_device(next(it), self.device)
                    if self.cuda_graphs:  # a new step: the graphs may reuse the previous step's output memory
                        torch.compiler.cudagraph_mark_step_begin()
                    with self._gradient_sync(micro == accum - 1):
                        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
                            loss, logs = self.loss_fn(self.train_model, batch)
                        (loss / accum).backward()
                    losses.append(loss.detach().float())
                    images += _num_images(batch)
                    self.batches_done += 1
                    bar.update(1)
                loss = torch.stack(losses).mean()
                if self.world_size > 1:  # the global batch's loss, and every rank stops together on a NaN
                    dist.all_reduce(loss)
                    loss /= self.world_size
                loss = loss.item()  # the one host sync per optimizer step
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss}) at optimizer step {self.step + 1} (epoch {self.epoch}, batch "
                        f"{self.batches_done}/{num_batches}); weights were not updated. Last good checkpoint: "
                        f"{self.last_checkpoint or 'none saved yet'}")
                lr = self.schedule.step(self.step)
                metrics = {"epoch": self.epoch + self.batches_done / num_batches, "train/loss": loss, "train/lr": lr}
                if cfg.optim.clip_grad is not None:
                    grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
                    metrics["train/grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.step)
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == 1):
                    now = time.perf_counter()
                    metrics["train/img_s"] = images * self.world_size / (now - t_last)  # ranks see equal batches
                    images, t_last = 0, now
                    metrics.update({f"train/{k}": float(v) for k, v in logs.items()})
                    self.metrics.log(self.step, metrics)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{metrics['train/img_s']:.0f}")
                if self.batches_done == num_batches:
                    self.epoch, self.batches_done = self.epoch + 1, 0
                    break  # epoch ends are evaluated and saved by fit()
                if cfg.save_every > 0 and self.step % cfg.save_every == 0:
                    self.save()
        finally:
            bar.close()

    def _gradient_sync(self, sync: bool):
        """Context for one micro-step's backward: gradients are reduced across ranks only when `sync`
        (the last micro-step of an accumulation)."""
        if is_sharded(self.model):
            self.model.set_requires_gradient_sync(sync)
        elif self.world_size > 1 and not sync:
            return self.train_model.no_sync()
        return contextlib.nullcontext()


class _StateDictView:
    """Stands in for a sharded model where `save_checkpoint` reads `model.state_dict()`: its full,
    gathered weights."""

    def __init__(self, weights: dict):
        self.weights = weights

    def state_dict(self) -> dict:
        return self.weights
