"""star's model names and their defaults, light enough for `import star` (no torch, no timm).

timm has no plugin entry point for models, and importing it takes seconds, so `import star` does not import
it: it registers the names with timm the moment timm is imported (at once if it already was). Each timm
entry builds its model through `star.models` only when called, so `star --help` stays fast and
`timm.create_model("star_base_patch16_224")` needs nothing but `import star`.
"""

import importlib.util
import sys
import warnings
from typing import Dict, Tuple

SIZES: Dict[str, dict] = {  # the spec's table: patch 16, d_state 16, expand 1
    "tiny": dict(embed_dim=192, depth=12),
    "small": dict(embed_dim=384, depth=12),
    "base": dict(embed_dim=768, depth=12),
    "large": dict(embed_dim=1024, depth=24),
    "huge": dict(embed_dim=1536, depth=24),
}

# name -> (architecture, constructor defaults): pretraining models at 192 px, classifiers at 224
MODEL_DEFAULTS: Dict[str, Tuple[str, dict]] = {}
# names that were renamed -> today's name: they still build (with a warning), and saved configs naming them load
MODEL_ALIASES: Dict[str, str] = {}
for _size, _dims in SIZES.items():
    MODEL_DEFAULTS[f"star_pretrain_{_size}_patch16_192"] = ("StarPretrain", dict(img_size=192, patch_size=16, **_dims))
    MODEL_DEFAULTS[f"star_{_size}_patch16_224"] = ("VisionMambaClassifier", dict(img_size=224, patch_size=16, **_dims))
    MODEL_ALIASES[f"star_{_size}_patch16_192"] = f"star_pretrain_{_size}_patch16_192"  # its name in star 0.1


def resolve_model_name(name: str) -> str:
    """Today's name for `name`, warning when it is a renamed one."""
    if name in MODEL_ALIASES:
        warnings.warn(f"model name {name!r} is renamed {MODEL_ALIASES[name]!r} (the pretraining model); the old "
                      f"name will be removed", FutureWarning, stacklevel=3)
        return MODEL_ALIASES[name]
    return name


def _timm_entry(name: str):
    """timm's entry point for `name`: builds through star.models, imported only then."""

    def entry(pretrained: bool = False, **kwargs):
        from star.models.registry import create_model

        return create_model(name, pretrained=pretrained, **kwargs)

    architecture, defaults = MODEL_DEFAULTS[name]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{architecture} with {defaults} (star)."
    return entry


def register_with_timm() -> None:
    """Make `timm.create_model(<star name>)` work (also with features_only=True); renamed names map to
    today's through timm's deprecations, which warn."""
    from timm.models import is_model, register_model, register_model_deprecations

    module = sys.modules[__name__]
    for name in MODEL_DEFAULTS:
        if not is_model(name):  # each model gets its pretrained_cfg when built (star.models.registry)
            setattr(module, name, register_model(_timm_entry(name)))  # where timm's deprecations look entries up
    register_model_deprecations(__name__, MODEL_ALIASES)


class _RegisterAfterTimm:
    """A meta path finder (not subclassing importlib.abc's, whose import costs `import star` 25 ms): finds the
    `timm` package as usual, and registers star's names once it has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing into this finder
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                register_with_timm()

            spec.loader.exec_module = exec_then_register
        return spec


def register_when_timm_is_imported() -> None:
    """Register with timm now if it is imported, else the moment it is (what `import star` calls)."""
    if "timm" in sys.modules:
        register_with_timm()
    elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())
