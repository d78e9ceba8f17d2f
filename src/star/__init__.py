"""star: STAR autoregressive pretraining of Vision Mamba, and fine-tuning for classification."""

from star.model_names import register_when_timm_is_imported

__version__ = "0.1.0"

_MODEL_API = ("StarPretrain", "VisionMambaClassifier", "classifier_from_pretrain", "create_model", "list_models",
              "load_pretrained")
__all__ = [*_MODEL_API, "convert_arm"]

# timm.create_model("star_...") works after `import star` alone, without importing timm or the models here
register_when_timm_is_imported()


def __getattr__(name):
    # Lazy, so that `import star.data` (e.g. in DataLoader workers) does not pull in the models and kernels.
    if name in _MODEL_API:
        import star.models

        return getattr(star.models, name)
    if name == "convert_arm":
        from star.convert import convert_arm

        return convert_arm
    raise AttributeError(f"module 'star' has no attribute {name!r}")
