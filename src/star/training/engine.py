"""One training engine for pretraining, fine-tuning and linear probing (MAE-style loop).

`star.build.build_trainer(cfg, model, loss_fn, train_loader, val_loader).fit()` runs a whole job: AdamW
with per-step warmup + cosine lr, gradient accumulation, grad clipping, bf16 autocast on CUDA, optional
EMA, evaluation, metrics (tqdm, `metrics.csv`, TensorBoard) and checkpoints; the builder makes the
objects (device, DDP/FSDP, compile, optimizer, schedule, EMA) and the `Trainer` runs the loop. There is no
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
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from star.config import CUDA_GRAPH_MODES, TrainConfig, config_to_dict, save_config
from star.models.hub import CLASSES_FILE, RUN_CONFIG_FILE, load_state_dict_checked, snapshot_dir
from star.training.checkpoint import (atomic_write, clean_interrupted_saves, find_resumable, latest_checkpoint,
                                      lock_run_dir, read_checkpoint, resolve_checkpoint, save_checkpoint,
                                      step_checkpoints)
from star.training.distributed import (all_gather_objects, full_model_state_dict, is_sharded, load_full_model_state_dict,
                                       load_optimizer_state_by_name, optimizer_state_by_name)
from star.training.metrics import MetricsLogger, evaluate
from star.training.provenance import environment
from star.training.runtime import (get_rng_state, num_images, rank_and_world_size, resolve_amp, seed_everything,
                                   set_rng_state, to_device)
from star.training.schedule import CosineSchedule

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]
# A parameter beyond this has diverged: trained weights of these models stay within a few units (the largest,
# Mamba's A_log, is log(d_state)), and AdamW moves a weight by about lr per step.
MAX_WEIGHT = 1e6


# ---------------------------------------------------------------------------- trainer


def steps_per_epoch(train_loader, accum_iter: int) -> int:
    """Optimizer steps in one pass over `train_loader` (a trailing partial accumulation is dropped)."""
    steps = len(train_loader) // accum_iter
    if steps == 0:
        raise ValueError(f"the train loader has {len(train_loader)} batches per epoch, fewer than accum_iter={accum_iter}")
    return steps


class Trainer:
    """Trains `model` with `loss_fn(model, batch) -> (loss, logs)` as `cfg` says.

    `train_loader` yields a fixed number of batches per epoch (`len(loader)`). Its batch sampler
    (e.g. `star.data.StarBatchSampler`, K=1 for classification) should have `set_epoch(epoch)`,
    `state_dict(batches_done=n)` and `load_state_dict(state)`, the last making the next iter() start
    at batch n of the saved epoch; without them resuming mid-epoch draws and discards the batches
    already consumed (correct, but slow). A sampler with `span_epochs` (and `state_dict(batches_done=n,
    epoch=e)`) gets one iterator for the whole run, so no epoch starts by waiting for its first batch; a resume
    is then exact where iter() draws nothing from the global RNG (`build_sequence_loader`'s loaders: a plain
    DataLoader without a `generator` seeds its workers from it).
    `val_loader`, for classification tasks, yields (images, labels).
    The model arrives on `device` with its optimizer, lr schedule and EMA built (`star.build.build_trainer`);
    `train_model` is the model as the loss calls it (DDP-wrapped, compiled), `model` the module whose weights
    are saved. The trainer owns the run directory: it locks it, resumes from it and writes to it.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, train_loader, val_loader=None, *,
                 optimizer: torch.optim.Optimizer, schedule: CosineSchedule, device: torch.device,
                 train_model: Optional[nn.Module] = None, ema: Optional[ModelEmaV3] = None):
        self.cfg, self.loss_fn = cfg, loss_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.rank, self.world_size = rank_and_world_size()
        self.is_main = self.rank == 0
        self.device, self.amp_dtype = device, resolve_amp(cfg.amp, device)
        self.run_dir = Path(cfg.output_dir)
        self.model = model
        self.train_model = model if train_model is None else train_model  # what the loss sees: DDP / compiled
        self.cuda_graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES
        self.optimizer, self.schedule, self.ema = optimizer, schedule, ema
        self.steps_per_epoch = steps_per_epoch(train_loader, cfg.optim.accum_iter)
        self.total_steps = schedule.total_steps

        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch
        self.batches_done = 0  # micro-batches of the current epoch consumed
        self.last_checkpoint: Optional[Path] = None
        self._saved_step: Optional[int] = None  # the step last_checkpoint holds: a step is saved once
        self._rng_to_restore: Optional[dict] = None
        self._sampler_to_restore: Optional[dict] = None
        self._run_batches = None  # the iterator that spans the run's epochs, where the sampler can
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

    def write_model_folder(self, module: nn.Module, folder: Path, state_dict: Optional[dict] = None) -> None:
        """A model folder that `--pretrained`, `star eval` and `star predict` read: `module`'s weights (or
        `state_dict`, e.g. gathered from a sharded model), the run's config beside them, and for a classifier
        the names of its classes. Rank 0 only."""
        module.save_pretrained(folder, state_dict=state_dict)
        save_config(self.cfg, folder / RUN_CONFIG_FILE)
        if self.cfg.task != "pretrain":  # `star predict` names classes with it
            (folder / CLASSES_FILE).write_text(json.dumps(list(self.train_loader.dataset.classes)) + "\n")

    def save_snapshot(self) -> Path:
        """The model at this epoch's end as a model folder, <run>/model_epochNNNN (`snapshot_every`: encoders
        kept at several points of one long pretraining). Every rank must call this, as it gathers sharded
        weights."""
        self._check_weights()
        weights = full_model_state_dict(self.model) if is_sharded(self.model) else None
        folder = snapshot_dir(self.run_dir, self.epoch)
        if self.is_main:
            self.write_model_folder(self.model, folder, weights)
        return folder

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
        sampler = self._batch_sampler
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
                # the snapshot before the checkpoint: a run killed between them redoes the epoch and its snapshot
                if epoch_end and self.cfg.snapshot_every and self.epoch % self.cfg.snapshot_every == 0:
                    self.save_snapshot()
                if final or (epoch_end and self.cfg.save_every >= 0):
                    self.save()
        except BaseException:
            self.close()
            raise
        finally:
            self._run_batches = None  # sized for this fit(): a later one (a raised max_steps) makes its own
            if hasattr(self._batch_sampler, "span_epochs"):
                self._batch_sampler.span_epochs(1)  # a plain iter() of the loader is one epoch again
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

    @property
    def _batch_sampler(self):
        """The train loader's batch sampler (a StarBatchSampler for the loaders star builds), or None."""
        return getattr(self.train_loader, "batch_sampler", None)

    def _sampler_state(self) -> Optional[dict]:
        sampler = self._batch_sampler
        if not hasattr(sampler, "state_dict"):
            return None
        if hasattr(sampler, "span_epochs"):  # its own epoch may be ahead of the loop's
            return sampler.state_dict(batches_done=self.batches_done, epoch=self.epoch)
        return sampler.state_dict(batches_done=self.batches_done)

    def _epoch_batches(self):
        """The iterator over the current epoch's remaining batches.

        Where the batch sampler can span epochs, the first call makes one iterator for every epoch up to the
        run's end, and later calls return it at the next epoch's start: the loader's workers load across the
        epoch boundary, where a new iterator per epoch waits for a worker to load a whole batch."""
        if self._run_batches is not None:
            return self._run_batches
        sampler = self._batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip = self.batches_done
        if skip and self._sampler_to_restore is not None:
            sampler.load_state_dict(self._sampler_to_restore)
            self.batches_done, skip = sampler.state_dict()["batches_done"], 0  # in this run's batches (world size)
        self._sampler_to_restore = None
        spans = hasattr(sampler, "span_epochs")
        if spans:  # every epoch this fit() reaches: the current one's consumed batches plus the steps left
            per_epoch = self.steps_per_epoch * self.cfg.optim.accum_iter
            last_step = min(self.total_steps, self.cfg.max_steps or self.total_steps)
            batches = self.batches_done + (last_step - self.step) * self.cfg.optim.accum_iter
            sampler.span_epochs(-(-batches // per_epoch), per_epoch)
        # Creating the iterator may draw from the RNG. A checkpoint from an epoch's end was saved before that
        # epoch's iterator existed, so the RNG is restored first; one from mid-epoch, or from a run whose one
        # iterator spans its epochs, after it, so after.
        if self._rng_to_restore is not None and self.batches_done == 0 and not spans:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        it = iter(self.train_loader)
        for _ in range(skip):
            next(it)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if spans:
            self._run_batches = it
        return it

    def train_one_epoch(self) -> None:
        """Run optimizer steps until the epoch ends or training is done; resumes mid-epoch."""
        cfg, accum = self.cfg, self.cfg.optim.accum_iter
        num_batches = self.steps_per_epoch * accum  # a trailing partial accumulation is dropped
        it = self._epoch_batches()
        self.train_model.train()
        quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")  # tqdm's own switch, for log files
        bar = tqdm(total=num_batches, initial=self.batches_done, desc=f"{cfg.task} epoch {self.epoch}",
                   disable=not self.is_main or quiet, dynamic_ncols=True)
        images, t_last = 0, time.perf_counter()
        try:
            while not self._done():
                losses, logs = [], {}
                for micro in range(accum):
                    batch = to_device(next(it), self.device)
                    if self.cuda_graphs:  # a new step: the graphs may reuse the previous step's output memory
                        torch.compiler.cudagraph_mark_step_begin()
                    with self._gradient_sync(micro == accum - 1):
                        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
                            loss, logs = self.loss_fn(self.train_model, batch)
                        (loss / accum).backward()
                    losses.append(loss.detach().float())
                    images += num_images(batch)
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
