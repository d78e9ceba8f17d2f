"""Named model sizes, and `create_model` to build any of them (timm-style; also registered with timm).

Pretraining models are `star_<size>_patch16_192` (StarPretrain, 192 px, K=4 images per sequence) and
classifiers `star_<size>_patch16_224` (VisionMambaClassifier, 224 px, 4 scan directions). Every constructor
argument can be overridden, e.g. `create_model("star_tiny_patch16_192", img_size=32, patch_size=4,
in_chans=1, cluster_size=2)` for 32 px grayscale images.
"""

import fnmatch
import inspect
from typing import Callable, Dict, List

import torch.nn as nn

from star.models.classifier import VisionMambaClassifier
from star.models.star import StarPretrain

SIZES: Dict[str, dict] = {  # the spec's table: patch 16, d_state 16, expand 1
    "tiny": dict(embed_dim=192, depth=12),
    "small": dict(embed_dim=384, depth=12),
    "base": dict(embed_dim=768, depth=12),
    "large": dict(embed_dim=1024, depth=24),
    "huge": dict(embed_dim=1536, depth=24),
}

MODELS: Dict[str, Callable[..., nn.Module]] = {}
_TIMM_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm.create_model passes these


def _entry(cls: type, name: str, **defaults) -> Callable[..., nn.Module]:
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]

    def build(pretrained: bool = False, **overrides) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no released weights; load your own with star.load_pretrained(dir)")
        for key in _TIMM_ONLY_ARGS:
            overrides.pop(key, None)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"{name}: unknown argument(s) {', '.join(unknown)}; {cls.__name__} takes "
                             f"{', '.join(allowed)}")
        return cls(**{**defaults, **overrides})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{cls.__name__} with {defaults}."
    build.defaults = defaults
    MODELS[name] = build
    return build


for _size, _dims in SIZES.items():
    _entry(StarPretrain, f"star_{_size}_patch16_192", img_size=192, patch_size=16, **_dims)
    _entry(VisionMambaClassifier, f"star_{_size}_patch16_224", img_size=224, patch_size=16, **_dims)


def registered_defaults(name: str) -> dict:
    """The constructor arguments model `name` is registered with (e.g. img_size=224, embed_dim=768)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return dict(MODELS[name].defaults)


def list_models(pattern: str = "*") -> List[str]:
    return sorted(name for name in MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override its defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return MODELS[name](**overrides)


def register_with_timm() -> None:
    """Make `timm.create_model("star_base_patch16_224")` work too."""
    from timm.models import register_model
    from timm.models._registry import is_model

    for build in MODELS.values():
        if not is_model(build.__name__):
            register_model(build)
