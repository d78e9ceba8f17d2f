"""The `loss_fn(model, batch) -> (loss, logs)` callables the engine trains with.

One signature for every task keeps the engine task-agnostic: pretraining reads the loss the
model computes itself, classification adds mixup/cutmix and label smoothing (timm's).
"""

from __future__ import annotations

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from star.config import TrainConfig
from star.data import build_mixup


def pretrain_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """`batch` is images (B, K, C, H, W), or a tuple whose first item is; the model returns its loss."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(images)["loss"], {}


class ClassificationLoss:
    """Cross-entropy on (images, labels) batches, with optional mixup/cutmix (soft targets)
    or label smoothing."""

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        self.mixup_fn = build_mixup(mixup, cutmix, smoothing, num_classes)  # also smooths the soft targets
        if self.mixup_fn is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        images, targets = batch
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return self.criterion(model(images), targets), {}


def create_loss_fn(cfg: TrainConfig, num_classes: int | None = None):
    """The loss for `cfg.task`; classification needs `num_classes` (default: cfg.model.num_classes)."""
    if cfg.task == "pretrain":
        return pretrain_loss
    num_classes = num_classes or cfg.model.num_classes
    if num_classes is None:
        raise ValueError("classification loss needs num_classes (set model.num_classes)")
    return ClassificationLoss(num_classes, cfg.optim.smoothing, cfg.data.mixup, cfg.data.cutmix)
