"""Named model sizes, and `create_model` to build any of them (timm-style; also registered with timm).

Pretraining models are `star_pretrain_<size>_patch16_192` (StarPretrain, 192 px, K=4 images per sequence)
and classifiers `star_<size>_patch16_224` (VisionMambaClassifier, 224 px, 4 scan directions). Every
constructor argument can be overridden, e.g. `create_model("star_pretrain_tiny_patch16_192", img_size=32,
patch_size=4, in_chans=1, cluster_size=2)` for 32 px grayscale images. The names themselves live in
`star.model_names`, which `import star` reads without importing the models; the pretraining models' earlier
names (`star_<size>_patch16_192`) still build, with a warning.
"""

import fnmatch
import inspect
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch.nn as nn

from star.data.transforms import PRESETS
from star.model_names import MODEL_DEFAULTS, resolve_model_name
from star.models.classifier import VisionMambaClassifier
from star.models.star import StarPretrain

ARCHITECTURES = {"StarPretrain": StarPretrain, "VisionMambaClassifier": VisionMambaClassifier}
MODELS: Dict[str, Callable[..., nn.Module]] = {}
_TIMM_ONLY_ARGS = ("cache_dir",)  # timm.create_model passes it; star models have no weights to download


def _entry(name: str, architecture: str, defaults: dict) -> Callable[..., nn.Module]:
    cls = ARCHITECTURES[architecture]
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]

    def build(pretrained: bool = False, pretrained_cfg: Optional[dict] = None,
              pretrained_cfg_overlay: Optional[dict] = None, features_only: bool = False,
              out_indices: Union[int, Sequence[int]] = 4, **overrides) -> nn.Module:
        """The model (timm's arguments: `features_only` wraps it in timm's FeatureGetterNet, which returns
        the (B, C, H/p, W/p) maps of blocks `out_indices`: n for the last n, or a list)."""
        if pretrained:
            raise ValueError(f"{name}: no released weights; load your own with star.load_pretrained(dir) (or "
                             f"`star convert arm` ARM's)")
        for key in _TIMM_ONLY_ARGS:
            overrides.pop(key, None)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"{name}: unknown argument(s) {', '.join(unknown)}; {cls.__name__} takes "
                             f"{', '.join(allowed)}")
        model = cls(**{**defaults, **overrides})
        cfg = _model_cfg(name, architecture, model, pretrained_cfg, pretrained_cfg_overlay)
        model.pretrained_cfg = model.default_cfg = cfg
        if features_only:
            from timm.models._features import FeatureGetterNet

            model = FeatureGetterNet(model, out_indices=list(out_indices) if not isinstance(out_indices, int)
                                     else out_indices)
            model.pretrained_cfg = model.default_cfg = cfg
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{cls.__name__} with {defaults}."
    build.defaults = defaults
    MODELS[name] = build
    return build


def pretrained_cfg(name: str, architecture: str, img_size: int, in_chans: int, num_classes: int = 0) -> dict:
    """timm's pretrained_cfg for a star model: star's eval preprocessing (the data preset for that many
    channels: ImageNet mean/std and resize 256 + crop 224 for RGB), so that `timm.data.resolve_data_config`
    + `create_transform` prepare images as `star eval` does."""
    preset = next((p for p in PRESETS.values() if len(p.mean) == in_chans), None)
    cfg = dict(architecture=name, input_size=(in_chans, img_size, img_size), interpolation="bicubic",
               crop_pct=preset.crop_pct if preset else 1.0, num_classes=num_classes, first_conv="patch_embed.proj",
               classifier="head" if architecture == "VisionMambaClassifier" else None, license="apache-2.0")
    if preset:
        cfg.update(mean=tuple(preset.mean), std=tuple(preset.std))
    return cfg


def _model_cfg(name: str, architecture: str, model: nn.Module, base: Optional[dict], overlay: Optional[dict]) -> dict:
    """The pretrained_cfg of this model's own input size and channels, updated with timm's arguments."""
    cfg = pretrained_cfg(name, architecture, model.img_size, model.in_chans, getattr(model, "num_classes", 0))
    if isinstance(base, dict):
        cfg.update(base)
    elif base is not None and not isinstance(base, str):  # timm passes a PretrainedCfg it resolved
        cfg.update(base.to_dict())
    cfg.update(overlay or {})
    return cfg


for _name, (_architecture, _defaults) in MODEL_DEFAULTS.items():
    _entry(_name, _architecture, _defaults)


def registered_defaults(name: str) -> dict:
    """The constructor arguments model `name` is registered with (e.g. img_size=224, embed_dim=768)."""
    name = resolve_model_name(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return dict(MODELS[name].defaults)


def list_models(pattern: str = "*") -> List[str]:
    return sorted(name for name in MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override its defaults (and timm's features_only,
    out_indices, pretrained_cfg_overlay work as in timm.create_model)."""
    name = resolve_model_name(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return MODELS[name](**overrides)
