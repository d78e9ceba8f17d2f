"""From a `TrainConfig` to the objects a run uses: the model, the data loaders, the trainer with its device,
wrapping, optimizer, schedule and EMA, and a saved run read back.

The entry points (`star.cli`, the experiments, the benchmarks) parse a config and call these; the training
engine (`star.training`) receives what they build. One place decides how a config becomes objects.
"""

import contextlib
import inspect
import io
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, default_collate

from star.config import CUDA_GRAPH_MODES, TrainConfig, check_config, load_config
from star.data import (PRESETS, DataPreset, LabeledSubset, build_dataset, build_sequence_loader,
                       finetune_transform, label_subset, pretrain_transform, train_val_split)
from star.models import VisionMambaClassifier, classifier_from_pretrain, create_model, load_pretrained
from star.models.hub import RUN_CONFIG_FILE, load_state_dict_checked, resolve_model_dir
from star.models.registry import registered_defaults
from star.training import CosineSchedule, Trainer, create_optimizer, freeze_for_linear_probe, resolve_lr
from star.training.checkpoint import load_weights, resolve_checkpoint
from star.training.distributed import EvalBatchSampler, wrap_model
from star.training.engine import LossFn, steps_per_epoch
from star.training.runtime import rank_and_world_size, resolve_device, seed_everything


def build_model(cfg: TrainConfig) -> nn.Module:
    """The pretraining model, or a classifier (from `cfg.pretrained` when given, else from scratch)."""
    overrides = cfg.model.overrides()
    if cfg.task == "pretrain":
        return create_model(cfg.model.name, **overrides)
    if not cfg.pretrained:
        if cfg.task == "linprobe":
            raise ValueError("linprobe needs --pretrained RUN_DIR (a linear probe of random weights measures nothing)")
        print("no --pretrained: fine-tuning from random weights")
        return create_model(cfg.model.name, **overrides)
    source = load_run_model(cfg.pretrained)[0]
    classifier_args = inspect.signature(VisionMambaClassifier).parameters
    unknown = sorted(set(overrides) - set(classifier_args))
    if unknown:  # pretraining's arguments (separator, decoder_*, ...) mean nothing to a classifier
        raise ValueError(f"{', '.join('model.' + k for k in unknown)}: not an argument of the classifier "
                         f"({cfg.model.name}); set it only when pretraining (a preset's pretrain: section)")
    kwargs = dict(overrides)
    # the input size of model.name (e.g. 224 for star_base_patch16_224) unless overridden: fine-tuning at
    # another size than pretraining (192 -> 224) interpolates the position embedding
    kwargs.setdefault("img_size", registered_defaults(cfg.model.name).get("img_size", source.img_size))
    model, report = classifier_from_pretrain(source, **kwargs)
    resized = f", position embedding resized {source.img_size} -> {model.img_size} px" \
        if model.img_size != source.img_size else ""
    print(f"initialised from {cfg.pretrained}: {len(report.missing_keys)} new weights "
          f"({', '.join(report.missing_keys)}), {len(report.unexpected_keys)} pretraining-only weights dropped"
          f"{resized}")
    return model


def load_run_model(path) -> Tuple[nn.Module, Path, Optional[TrainConfig]]:
    """A saved model folder (or a finished run's model/); else, for a run that was killed or has not
    finished, the model its config.yaml describes with the weights of its latest checkpoint. Returns (model,
    the folder the weights came from, the run's config when it was read)."""
    try:
        folder = resolve_model_dir(path)
        return load_pretrained(folder), folder, None
    except FileNotFoundError as no_model:
        try:
            ckpt = resolve_checkpoint(path)
        except FileNotFoundError:
            raise no_model from None
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{ckpt} has no config.yaml in its run directory {config.parent}, so the model it "
                                f"holds is unknown")
    cfg = load_config(str(config))
    with contextlib.redirect_stdout(io.StringIO()):  # how the run's model was first initialised is no news here
        model = build_model(cfg)
    load_state_dict_checked(model, load_weights(ckpt), source=str(ckpt))
    print(f"note: {path} has no finished model (killed, or still running?); using its latest checkpoint {ckpt}",
          file=sys.stderr)
    return model, ckpt, cfg


def load_run(path: str, task: str):
    """The saved model of a run (or model folder; or, for an unfinished run, its latest checkpoint) and the
    config it was trained with: the one saved beside the weights, else the run directory's; built-in
    defaults (and a warning) when there is neither."""
    model, model_dir, run_cfg = load_run_model(path)
    if run_cfg is not None:
        return model, model_dir, run_cfg
    saved = [p for p in (model_dir / RUN_CONFIG_FILE, model_dir.parent / "config.yaml") if p.is_file()]
    cfg = load_config(str(saved[0])) if saved else TrainConfig(task=task)
    if not saved:
        print(f"warning: no {RUN_CONFIG_FILE} in {model_dir} and no config.yaml beside it: preparing images with "
              f"the built-in defaults (data.mean_std {cfg.data.mean_std}, data.crop_pct {cfg.data.crop_pct})",
              file=sys.stderr)
    return model, model_dir, cfg


def _geometry(cfg: TrainConfig, model: nn.Module) -> Tuple[int, int]:
    img_size = cfg.data.img_size or model.img_size
    in_chans = cfg.data.in_chans or model.in_chans
    if in_chans != model.in_chans or img_size != model.img_size:
        raise ValueError(f"data gives {in_chans}-channel {img_size} px images but the model takes "
                         f"{model.in_chans}-channel {model.img_size} px ones; fix --data.* or --model.*")
    return img_size, in_chans


def data_preset(cfg: TrainConfig, in_chans: Optional[int] = None) -> DataPreset:
    """The normalization/augmentation preset `data.mean_std` names; with `in_chans`, one of that many channels."""
    if cfg.data.mean_std not in PRESETS:
        raise ValueError(f"data.mean_std={cfg.data.mean_std!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[cfg.data.mean_std]
    if in_chans is not None and len(preset.mean) != in_chans:
        fitting = sorted(name for name, p in PRESETS.items() if len(p.mean) == in_chans)
        raise ValueError(f"--data.mean_std {cfg.data.mean_std} normalizes {len(preset.mean)}-channel images but "
                         f"the model takes {in_chans}; choose one of {fitting}")
    return preset


def classification_transform(cfg: TrainConfig, img_size: int, in_chans: int, train: bool):
    """Fine-tuning augmentation (train) or resize + centre crop (eval), as `cfg.data` says."""
    data, preset = cfg.data, data_preset(cfg, in_chans)
    try:
        return finetune_transform(img_size, preset.mean, preset.std, train, auto_augment=data.auto_augment,
                                  re_prob=data.re_prob, crop_pct=data.crop_pct, scale=(data.scale_min, 1.0),
                                  hflip=0.5 if data.hflip else 0.0, crop_mode=data.crop_mode)
    except AssertionError as err:  # timm asserts on an auto-augment string it cannot parse
        raise ValueError(f"--data.auto_augment {data.auto_augment!r} is not a policy timm knows "
                         f"(e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, trivialaugment): {err}") from None


def build_loaders(cfg: TrainConfig, model: nn.Module) -> Tuple[DataLoader, Optional[DataLoader]]:
    """Train loader (STAR sequences for pretraining, single images otherwise) and, for classification, a
    validation loader: a holdout of the training set when data.val_size > 0, else the dataset's own split."""
    data, optim = cfg.data, cfg.optim
    img_size, in_chans = _geometry(cfg, model)
    preset = data_preset(cfg, in_chans)
    common = dict(root=data.root, in_chans=in_chans, img_size=img_size, skip_corrupt=data.skip_corrupt,
                  seed=cfg.seed)
    if cfg.task == "pretrain":
        transform = pretrain_transform(img_size, preset.mean, preset.std, scale=(data.scale_min, 1.0),
                                       hflip=data.hflip)
        train = build_dataset(data.dataset, "train", transform, num_samples=data.num_samples, **common)
        train = _subset(train, data.num_samples, cfg.seed)
        return build_sequence_loader(train, optim.batch_size, model.num_images, seed=cfg.seed,
                                     num_workers=data.num_workers), None

    train_tf = classification_transform(cfg, img_size, in_chans, True)
    eval_tf = classification_transform(cfg, img_size, in_chans, False)
    train = build_dataset(data.dataset, "train", train_tf, num_samples=data.num_samples, **common)
    evaluated = {**common, "skip_corrupt": "drop" if data.skip_corrupt else False}
    if data.val_size > 0:
        val = holdout_set(cfg, eval_tf, **evaluated)
        train = LabeledSubset(train, train_val_split(len(train), data.val_size, cfg.seed)[0])
    else:
        val = build_dataset(data.dataset, "val", eval_tf, **evaluated)
    train = _subset(train, data.num_samples, cfg.seed)
    if data.label_fraction < 1.0:
        train = LabeledSubset(train, label_subset(train.targets, data.label_fraction, cfg.seed))
    train_loader = build_sequence_loader(train, optim.batch_size, 1, seed=cfg.seed, num_workers=data.num_workers,
                                         collate_fn=default_collate)
    return train_loader, eval_loader(val, optim.batch_size, data.num_workers)


def holdout_set(cfg: TrainConfig, transform, **common) -> LabeledSubset:
    """The `data.val_size` training images a classification run holds out and validates on (seeded)."""
    full = build_dataset(cfg.data.dataset, "train", transform, num_samples=cfg.data.num_samples, **common)
    return LabeledSubset(full, train_val_split(len(full), cfg.data.val_size, cfg.seed)[1])


def eval_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Every image exactly once across all ranks, so all-reduced accuracy counts are exact; unreadable ones
    (None, from `skip_corrupt="drop"`) are left out, a batch of only those is None. Workers persist: a run
    evaluates every epoch, and restarting them took a 5k-image pass from 0.32 to 0.37 s (2 CPU workers)."""
    return DataLoader(dataset, batch_sampler=EvalBatchSampler(len(dataset), batch_size), num_workers=num_workers,
                      persistent_workers=num_workers > 0, collate_fn=_collate_readable)


def _collate_readable(samples):
    samples = [s for s in samples if s is not None]
    return default_collate(samples) if samples else None


def _subset(dataset, num_samples: Optional[int], seed: int):
    """The first `num_samples` of a seeded shuffle (a smaller, class-mixed training set), or all of it."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    return LabeledSubset(dataset, train_val_split(len(dataset), len(dataset) - num_samples, seed)[0])


def check_num_classes(model: nn.Module, dataset, name: str) -> None:
    """A classifier's head must have one output per class of the data (labels past it fail deep in the loss;
    extra outputs train silently and name no class)."""
    num_classes, classes = getattr(model, "num_classes", None), getattr(dataset, "classes", None)
    if num_classes is not None and classes is not None and num_classes != len(classes):
        raise ValueError(f"the model has {num_classes} outputs (model.num_classes) but {name} has {len(classes)} "
                         f"classes; set --model.num_classes {len(classes)}")


def num_skipped(dataset) -> int:
    """Unreadable files `skip_corrupt` skipped in `dataset` (through Subset wrappers) so far."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "num_skipped", 0)


def build_trainer(cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, train_loader: DataLoader,
                  val_loader: Optional[DataLoader] = None) -> Trainer:
    """The `Trainer` for `model` as `cfg` says: on its device (a linear probe frozen but for the head), wrapped
    for DDP/FSDP on several processes, compiled with `cfg.compile`, with AdamW at the scaled lr, the cosine
    schedule and the EMA. Every rank draws from its own seed from here on."""
    check_config(cfg)  # for callers that did not come through `star.cli.train.run`, which checks before building
    rank, world_size = rank_and_world_size()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + rank)
    if cfg.task == "linprobe":
        freeze_for_linear_probe(model)
    model = model.to(device)
    train_model = model
    if world_size > 1:
        if cfg.distributed == "fsdp" and cfg.optim.ema_decay is not None:
            raise ValueError("optim.ema_decay (model EMA) is not supported with distributed=fsdp; use ddp")
        if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
            raise ValueError(f"--compile_mode {cfg.compile_mode} (CUDA graphs) is not supported with multi-GPU "
                             "runs; use --compile_mode default or max-autotune-no-cudagraphs")
        train_model = wrap_model(model, device, cfg.distributed)
    if cfg.compile:
        train_model = torch.compile(train_model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    optim = cfg.optim
    steps = steps_per_epoch(train_loader, optim.accum_iter)
    lr = resolve_lr(optim, world_size)
    optimizer = create_optimizer(model, optim, lr)
    schedule = CosineSchedule(optimizer, lr, optim.min_lr, optim.warmup_epochs * steps, optim.epochs * steps)
    ema = ModelEmaV3(model, decay=optim.ema_decay) if optim.ema_decay is not None else None
    return Trainer(cfg, model, loss_fn, train_loader, val_loader, optimizer=optimizer, schedule=schedule,
                   device=device, train_model=train_model, ema=ema)
