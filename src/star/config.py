"""Run configuration: nested dataclasses, YAML presets and `--dotted.name value` overrides.

One `TrainConfig` describes a whole run (pretrain, finetune or linprobe). Presets ship as
`star/configs/NAME.yaml`: shared keys at the top plus one section per task (`pretrain:`,
`finetune:`, `linprobe:`) merged over them, so `star pretrain --config fmnist-tiny` and
`star finetune --config fmnist-tiny` read the same file. Every value is checked against its
field's type when loaded, so a typo fails at once with the field's name, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

TASKS = ("pretrain", "finetune", "linprobe")
DEVICES = ("auto", "cpu", "cuda")  # auto = cuda when available
PRESET_DIR = Path(__file__).parent / "configs"
MAX_LR = 1e3  # AdamW moves every weight by about lr per step: far beyond this, a run can only diverge


@dataclass
class ModelConfig:
    """A registry model plus optional overrides; None keeps the registry default."""

    name: str = "star_pretrain_tiny_patch16_192"  # a registered model (star.list_models()); the fields below override it
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    in_chans: Optional[int] = None
    cluster_size: Optional[int] = None  # patches per cluster side (4 -> 4x4 patches per cluster)
    num_images: Optional[int] = None  # K images packed into one pretraining sequence
    separator: Optional[Literal["cluster", "token", "fixed", "none"]] = None
    separator_value: Optional[float] = None  # the constant of separator "fixed"
    cls_token: Optional[bool] = None
    decoder_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    decoder_window: Optional[Literal["image", "sequence"]] = None  # what a query reads: its own image, or all before
    num_classes: Optional[int] = None
    global_pool: Optional[Literal["avg", "token"]] = None  # classifier: mean of the tokens beside cls, or cls
    fc_norm: Optional[bool] = None  # classifier: LayerNorm the pooled features (True) or every token (ARM's)
    drop_path_rate: Optional[float] = None
    scan_impl: Optional[Literal["auto", "ref", "chunked", "triton"]] = None
    # what backward recomputes instead of keeping: none, the mixer's conv and projections (models/mamba.py), or
    # the whole block
    recompute: Optional[Literal["none", "mixer", "block"]] = None

    def overrides(self) -> dict[str, Any]:
        """The keyword arguments to pass to the model factory (name excluded, None dropped)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # "fashion-mnist", "synthetic", or a path to an image-folder root
    root: Optional[str] = None  # Fashion-MNIST folder; None = search $STAR_DATA, ../shared/data, /usr/share/datasets
    img_size: Optional[int] = None  # None = the model's input size
    in_chans: Optional[int] = None  # None = the model's input channels
    num_workers: int = 4  # data-loading processes per training process; 0 = load in the main process
    skip_corrupt: bool = False  # skip unreadable images instead of failing
    label_fraction: float = 1.0  # fine-tune on this fraction of the labelled training set
    val_size: int = 0  # training images held out for validation; 0 = use the dataset's own split
    num_samples: Optional[int] = None  # synthetic: images to generate; others: cap on training images
    mean_std: str = "imagenet"  # normalization preset name
    # augmentation (timm names)
    scale_min: float = 0.2  # RandomResizedCrop scale lower bound (pretraining and fine-tuning)
    hflip: bool = True  # random horizontal flips
    auto_augment: Optional[str] = None  # e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha, 0 = off
    cutmix: float = 0.0  # cutmix alpha, 0 = off
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then center crop
    # eval: resize the shorter side (center) or the whole image (squash, as ARM evaluates) to img_size / crop_pct
    crop_mode: Literal["center", "squash"] = "center"


@dataclass
class OptimConfig:
    epochs: int = 100  # passes over the training set
    warmup_epochs: float = 5.0  # linear lr warmup, then half-cycle cosine to min_lr
    batch_size: int = 64  # images per optimizer micro-step per device
    accum_iter: int = 1  # micro-steps per optimizer step
    blr: float = 1.5e-4  # base lr, scaled by effective batch / 256 (see star.training.schedule)
    lr: Optional[float] = None  # absolute lr; None = derived from blr
    min_lr: float = 0.0  # lr at the end of the cosine schedule
    weight_decay: float = 0.05  # AdamW's, not on norms, biases, A_log, D and learned tokens
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's
    clip_grad: Optional[float] = None  # max global grad norm, None = no clipping
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning), None = off
    smoothing: float = 0.0  # label smoothing
    ema_decay: Optional[float] = None  # model EMA decay per optimizer step, None = off


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay steps as CUDA graphs


@dataclass
class TrainConfig:
    task: Literal[TASKS] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/star"  # the run directory: metrics, checkpoints and, at the end, model/
    seed: int = 0  # weights, data order and augmentation
    device: Literal[DEVICES] = "auto"  # auto = cuda when available
    amp: Literal["auto", "bf16", "none"] = "auto"  # auto = bf16 autocast on CUDA, off on CPU
    compile: bool = False  # torch.compile the model
    # torch.compile's mode; reduce-overhead replays each step as CUDA graphs, which removes the per-kernel
    # launch cost that dominates small models (2.3-2.7x on the Fashion-MNIST study's step, docs/benchmarks)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    distributed: Literal["ddp", "fsdp"] = "ddp"  # multi-GPU: replicate (ddp) or shard with FSDP2 (large/huge)
    log_every: int = 20  # optimizer steps between metric rows
    save_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch ends, -1 = only the last
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    snapshot_every: int = 0  # epochs between saved models <run>/model_epochNNNN, kept beside model/ (0 = none)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs)
    resume: Optional[str] = None  # checkpoint dir, run dir, or "auto" (latest in output_dir)
    pretrained: Optional[str] = None  # pretraining weights to fine-tune from: a run dir or a saved model folder
    keep_last: int = 3  # checkpoints kept on disk; 0 = keep all


# ---------------------------------------------------------------------------- parsing values

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin is tuple:
        return "comma-separated " + ",".join(_type_name(a) for a in args)
    return tp.__name__


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert `value` (from YAML or the command line) to type `tp`, or raise naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"config field '{name}': expected {_type_name(tp)}, got {value!r}")
    if origin is Union:
        (inner,) = [a for a in args if a is not type(None)]
        if typing.get_origin(inner) is Literal and value in typing.get_args(inner):
            return value  # a choice spelled "none" (separator: none) is that choice, not "unset"
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner, name)
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin is tuple:
        items = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise bad
        return tuple(_coerce(v, a, name) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            out = tp(value)
        except ValueError:
            raise bad from None
        if tp is int and isinstance(value, float) and value != out:
            raise bad
        return out
    if tp is str and isinstance(value, str):
        return value
    raise bad


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_names(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted field name of TrainConfig, for "did you mean" hints."""
    names = []
    for name, tp in _fields(cls or TrainConfig).items():
        names += _all_names(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return names


def _unknown_key(key: str, prefix: str, allowed: list[str]) -> ValueError:
    names = _all_names()
    close = difflib.get_close_matches(prefix + key, names, n=1) or [n for n in names if n.endswith("." + key)][:1]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return ValueError(f"unknown config key '{prefix}{key}'.{hint} Allowed keys in {section}: {', '.join(allowed)}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict, checking every key and value."""
    if not isinstance(data, dict):
        raise ValueError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, prefix, list(fields))
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    return _from_dict(TrainConfig, data)


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML and for checkpoints."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------- files and presets


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name_or_path: str, task: Optional[str] = None) -> TrainConfig:
    """Load a preset name (see `list_presets()`) or a YAML file path.

    A file with task sections needs `task` (or a top-level `task:` key) to pick one; a flat
    file (e.g. a saved run config) loads as is, with `task` replacing its task if given.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"config '{name_or_path}' is neither a YAML file nor a preset; presets: {', '.join(list_presets())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    sections = {t: raw.pop(t) for t in TASKS if t in raw}
    task = task or raw.get("task")
    if sections:
        if task is None and len(sections) == 1:
            task = next(iter(sections))
        if task not in sections:
            raise ValueError(f"{path} has no '{task}' recipe; it has: {', '.join(sections)}")
        raw = _merge(raw, sections[task] or {})
    if task is not None:
        raw["task"] = task
    return config_from_dict(raw)


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(config_to_yaml(cfg))


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    """Return a copy of `cfg` with `--section.field value` / `--field=value` overrides applied.

    A bool field given without a value (`--compile`) is set to true.
    """
    data = config_to_dict(cfg)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected an override like --optim.blr 1e-4, got {arg!r}")
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("-", "_")  # --optim.batch-size works too: one flag style, both spellings
        tp = _lookup(name)
        if not has_value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            elif tp is bool:
                value = "true"
            else:
                raise ValueError(f"override --{name} needs a value ({_type_name(tp)})")
        *parents, leaf = name.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = _coerce(value, tp, name)
        i += 1
    return config_from_dict(data)


def _lookup(name: str) -> Any:
    """The type of dotted field `name`, or a ValueError naming what is allowed."""
    cls, prefix = TrainConfig, ""
    parts = name.split(".")
    for depth, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            raise _unknown_key(part, prefix, list(fields))
        tp, section = fields[part], f"{prefix}{part}"
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"'{name}' is a section; set one of its fields: {', '.join(f'{section}.{f}' for f in _fields(tp))}")
            return tp
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"'{section}' is not a section, so '{name}' does not exist")
        cls, prefix = tp, section + "."


# ---------------------------------------------------------------------------- values in range

def check_config(cfg: TrainConfig) -> None:
    """Values out of range fail here, naming the flag, before a model or a data set is built (instead of an
    assert deep in timm, a `step % 0`, or a run that silently trains on nonsense)."""
    d, o, m = cfg.data, cfg.optim, cfg.model
    at_least = [("model.embed_dim", m.embed_dim, 1), ("model.depth", m.depth, 1), ("model.img_size", m.img_size, 1),
                ("model.patch_size", m.patch_size, 1), ("model.cluster_size", m.cluster_size, 1),
                ("model.num_images", m.num_images, 1), ("model.decoder_dim", m.decoder_dim, 1),
                ("model.decoder_num_heads", m.decoder_num_heads, 1), ("data.img_size", d.img_size, 1),
                ("log_every", cfg.log_every, 1), ("save_every", cfg.save_every, -1),
                ("eval_every", cfg.eval_every, 0), ("snapshot_every", cfg.snapshot_every, 0),
                ("keep_last", cfg.keep_last, 0), ("max_steps", cfg.max_steps, 1),
                ("optim.epochs", o.epochs, 1), ("optim.accum_iter", o.accum_iter, 1),
                ("optim.batch_size", o.batch_size, 1), ("optim.warmup_epochs", o.warmup_epochs, 0),
                ("optim.min_lr", o.min_lr, 0), ("optim.weight_decay", o.weight_decay, 0),
                ("data.num_workers", d.num_workers, 0), ("data.val_size", d.val_size, 0),
                ("data.num_samples", d.num_samples, 1), ("data.mixup", d.mixup, 0), ("data.cutmix", d.cutmix, 0),
                ("model.num_classes", cfg.model.num_classes, 1)]
    for name, value, least in at_least:
        if value is not None and not value >= least:  # NaN too
            raise ValueError(f"--{name} must be >= {least}, got {value}")
    # (low, high, low included, high included)
    intervals = [("data.label_fraction", d.label_fraction, 0, 1, False, True),
                 ("data.scale_min", d.scale_min, 0, 1, False, True), ("data.crop_pct", d.crop_pct, 0, 1, False, True),
                 ("data.re_prob", d.re_prob, 0, 1, True, True), ("optim.smoothing", o.smoothing, 0, 1, True, False),
                 ("optim.ema_decay", o.ema_decay, 0, 1, True, False),
                 ("optim.layer_decay", o.layer_decay, 0, 1, False, True),
                 ("optim.betas", o.betas[0], 0, 1, True, False), ("optim.betas", o.betas[1], 0, 1, True, False)]
    for name, value, low, high, low_in, high_in in intervals:
        if value is None:
            continue
        if not ((value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
            span = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ValueError(f"--{name} must be in {span}, got {value}")
    for name, value in (("optim.blr", o.blr), ("optim.lr", o.lr)):
        if value is not None and not 0 < value <= MAX_LR:  # NaN and inf too
            raise ValueError(f"--{name} must be in (0, {MAX_LR:g}], got {value} (AdamW moves every weight by about "
                             "the lr per step)")
    if o.clip_grad is not None and not o.clip_grad > 0:
        raise ValueError(f"--optim.clip_grad must be > 0, got {o.clip_grad}")
    if (d.mixup > 0 or d.cutmix > 0) and o.batch_size % 2:
        raise ValueError(f"--data.mixup/--data.cutmix pair images within a batch: --optim.batch_size must be even, "
                         f"got {o.batch_size}")
    if o.warmup_epochs >= o.epochs:  # a warning, not an error: fine for a smoke run (shown once per message)
        warnings.warn(f"--optim.warmup_epochs {o.warmup_epochs} >= --optim.epochs {o.epochs}: the learning rate "
                      "only warms up and never decays")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile_mode {cfg.compile_mode} takes effect only with --compile")
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and o.accum_iter > 1:
        # each micro-step's graph replay would overwrite the gradients the previous one accumulated
        raise ValueError(f"--compile_mode {cfg.compile_mode} (CUDA graphs) does not support gradient "
                         f"accumulation (--optim.accum_iter {o.accum_iter}); use --compile_mode "
                         "max-autotune-no-cudagraphs or default")
    if cfg.task == "pretrain" and cfg.pretrained:
        raise ValueError("--pretrained starts a fine-tune or linear probe from pretrained weights; pretraining "
                         "starts from random weights (to continue a pretraining run, use --resume)")


def _descriptions(cls: type = None, prefix: str = "") -> dict[str, str]:
    """Every field's description: the comment after it in its dataclass (and comment lines right above it),
    so that `--help` and the source say the same thing."""
    cls = cls or TrainConfig
    fields, out, above = _fields(cls), {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        match = re.match(r"(\w+):[^#]*(?:#\s*(.*))?$", text)
        if match and match.group(1) in fields:
            name = match.group(1)
            if dataclasses.is_dataclass(fields[name]):
                out.update(_descriptions(fields[name], f"{prefix}{name}."))
            else:  # the comment after the field, else the lines above it (not a section heading above both)
                out[prefix + name] = match.group(2) or " ".join(above)
        above = []
    return out


def config_help() -> str:
    """Every overridable field with its type, built-in default and description, one line each (the task
    commands' --help); a preset sets many of them, which `--print_config` shows."""
    defaults, descriptions = config_to_dict(TrainConfig()), _descriptions()
    lines = []
    for name in _all_names():
        if name == "task":  # the command sets it
            continue
        value = defaults
        for part in name.split("."):
            value = value[part]
        about = descriptions.get(name, "")
        if value is None and name.startswith("model."):
            about = (about + "; " if about else "") + "None = the value model.name is registered with"
        lines.append(f"  --{name}: {_type_name(_lookup(name))} (built-in default {value})" + (f": {about}" if about
                                                                                              else ""))
    return "\n".join(lines)
