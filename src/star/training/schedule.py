"""Learning rate: the batch-size scaling rule and the per-step warmup + cosine schedule.

Both are stated here once. The schedule is a pure function of the optimizer step, so
resuming needs only the step count, never a scheduler state.
"""

from __future__ import annotations

import math

import torch

from star.config import OptimConfig


def resolve_lr(optim: OptimConfig, world_size: int = 1) -> float:
    """Peak lr: `optim.lr` if set, else the MAE rule `blr * effective_batch / 256`,
    effective_batch = batch_size * accum_iter * world_size."""
    if optim.lr is not None:
        return optim.lr
    return optim.blr * optim.batch_size * optim.accum_iter * world_size / 256


def cosine_lr(step: float, lr: float, min_lr: float, warmup_steps: float, total_steps: float) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then a half-cycle cosine down to
    `min_lr` at `total_steps` (held there after)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """Sets every param group's lr to `cosine_lr(step) * group["lr_scale"]` (layer decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: float, total_steps: float):
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def step(self, step: int) -> float:
        """Apply the lr of optimizer step `step` (0-based); returns the unscaled lr."""
        lr = cosine_lr(step, self.lr, self.min_lr, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
