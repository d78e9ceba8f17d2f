"""AdamW with the STAR/MAE parameter groups, and linear-probe freezing.

Weight decay skips every parameter with ndim <= 1 (norms, biases) and the names the model lists in
`no_weight_decay()` (A_log, D, separator/cls tokens). Fine-tuning adds layer-wise lr decay: each
group carries an `lr_scale` that `CosineSchedule` multiplies in. Grouping is timm's
(`param_groups_weight_decay` / `param_groups_layer_decay`, which match the names with fnmatch);
layer ids come from the model's timm-style `group_matcher()`.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from star.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups over the trainable parameters; with `layer_decay`, each group has an `lr_scale`."""
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and layer_decay != 1.0:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"layer_decay={layer_decay} needs a model with group_matcher(); {type(model).__name__} has none")
        return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)


def create_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`; the schedule sets each group's lr every step.

    On CUDA it is PyTorch's fused AdamW (as nanoGPT does): one kernel per group instead of foreach's dozen,
    which counts in steps of small models with many layer-decay groups. Sharded (FSDP2 DTensor) and CPU
    parameters keep the default implementation."""
    groups = param_groups(model, optim.weight_decay, optim.layer_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda and type(p) is nn.Parameter for p in params)  # an FSDP2 DTensor is a subclass
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, fused=fused or None)


def freeze_for_linear_probe(model: nn.Module, head: str = "head") -> list[str]:
    """Freeze everything except the classifier `head` module; returns the trainable names.

    No BatchNorm is inserted before the head (MAE does): the classifier already LayerNorms its pooled
    features (STAR_SPEC section 4), which puts them on a common scale, and keeping the module tree
    unchanged keeps checkpoints loadable by the plain classifier. The head's input is thus a fixed
    function of frozen features, so the probe stays linear.
    """
    if not isinstance(getattr(model, head, None), nn.Module):
        raise ValueError(f"linear probe needs a '{head}' submodule; {type(model).__name__} has none")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
        if p.requires_grad:
            trainable.append(name)
    return trainable
