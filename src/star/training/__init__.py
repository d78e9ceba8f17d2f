"""Training: one engine for pretraining, fine-tuning and linear probing, plus optimizer, lr schedule and checkpoints."""

from star.training.checkpoint import (
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from star.training.engine import Trainer
from star.training.metrics import evaluate
from star.training.runtime import get_rng_state, resolve_amp, resolve_device, seed_everything, set_rng_state
from star.training.losses import ClassificationLoss, create_loss_fn, pretrain_loss
from star.training.optim import create_optimizer, freeze_for_linear_probe, param_groups
from star.training.schedule import CosineSchedule, cosine_lr, resolve_lr
