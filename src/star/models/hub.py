"""Weights as safetensors with a JSON config beside them, loadable without the code that trained them."""

import inspect
import json
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
MODEL_DIR = "model"  # a finished `star` run keeps its final weights in <run>/model
RUN_CONFIG_FILE = "run_config.yaml"  # the run's config beside its weights: how to prepare images for them
CLASSES_FILE = "classes.json"  # class names beside a classifier's weights
WEIGHTS_NAME = "model.safetensors"


def snapshot_dir(run_dir: Union[str, Path], epoch: int) -> Path:
    """Where a run keeps its model at the end of `epoch` (`--snapshot_every`): <run>/model_epochNNNN."""
    return Path(run_dir) / f"{MODEL_DIR}_epoch{epoch:04d}"

ARCHITECTURES: Dict[str, type] = {}  # class name -> class, filled by `register_architecture`


def register_architecture(cls: type) -> type:
    ARCHITECTURES[cls.__name__] = cls
    return cls


def state_dict_mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, list]:
    """Missing, unexpected and shape-mismatched keys of `state_dict` against `model`."""
    own = model.state_dict()
    return {
        "missing": sorted(k for k in own if k not in state_dict),
        "unexpected": sorted(k for k in state_dict if k not in own),
        "mismatched": sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                             for k, v in state_dict.items() if k in own and v.shape != own[k].shape),
    }


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """`load_state_dict(strict=True)`, but a mismatch fails with every offending key listed by kind."""
    problems = {kind: keys for kind, keys in state_dict_mismatches(model, state_dict).items() if keys}
    if problems:
        lines = [f"{source} does not fit {type(model).__name__} (another architecture or size?):"]
        for kind, keys in problems.items():
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            lines.append(f"  {kind} keys: {shown}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def constructor_args(cls: type, values: Mapping) -> dict:
    """`cls.__init__`'s arguments as this call has them (`values` = its `locals()`): the model's config, which
    `save_pretrained` writes and `from_pretrained` builds from; the signature is the one list of them."""
    return {name: values[name] for name in inspect.signature(cls.__init__).parameters if name != "self"}


class PretrainedMixin:
    """`save_pretrained(dir)` / `from_pretrained(dir)`. Models keep their constructor arguments in `init_args`."""

    init_args: dict
    # arguments added after models were first saved, with the value those models were built with: a saved
    # config that lacks one gets that value, not today's default
    saved_before: dict = {}

    def save_pretrained(self, path: Union[str, Path], state_dict: Mapping[str, torch.Tensor] = None) -> Path:
        """Write config.json + model.safetensors; `state_dict` replaces this module's own (e.g. the full
        weights gathered from a sharded model)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"architecture": type(self).__name__, **self.init_args}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        state_dict = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        tmp.replace(path / WEIGHTS_NAME)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **overrides) -> nn.Module:
        """Build the model its config.json names and load its weights (a `save_pretrained` folder, or a run
        directory holding one in model/); `overrides` change constructor arguments that don't alter the
        weights' shapes (e.g. drop_path_rate, scan_impl)."""
        path = resolve_model_dir(path)
        config = json.loads((path / CONFIG_NAME).read_text())
        arch = config.pop("architecture", None)
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path / CONFIG_NAME} names architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        model_cls = ARCHITECTURES[arch]
        if cls is not PretrainedMixin and not issubclass(model_cls, cls):
            raise ValueError(f"{path} holds a {arch}, not a {cls.__name__}")
        model = model_cls(**{**model_cls.saved_before, **config, **overrides})
        load_state_dict_checked(model, load_file(str(path / WEIGHTS_NAME)), source=str(path))
        return model


def resolve_model_dir(path: Union[str, Path]) -> Path:
    """A `save_pretrained` folder, or a run directory holding one in model/."""
    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no saved model: expected {CONFIG_NAME} + {WEIGHTS_NAME} there or in "
                            f"{path / MODEL_DIR} (save_pretrained, or a finished `star pretrain/finetune` run, "
                            f"writes them)")


def load_pretrained(path: Union[str, Path], **overrides) -> nn.Module:
    """Load any star model saved with `save_pretrained`, whatever its class."""
    return PretrainedMixin.from_pretrained(path, **overrides)
