"""star: STAR autoregressive pretraining of Vision Mamba, and fine-tuning for classification."""

__version__ = "0.1.0"

_MODEL_API = ("StarPretrain", "VisionMambaClassifier", "classifier_from_pretrain", "create_model", "list_models",
              "load_pretrained")
__all__ = list(_MODEL_API)


def __getattr__(name):
    # Lazy, so that `import star.data` (e.g. in DataLoader workers) does not pull in the models and kernels.
    if name in _MODEL_API:
        import star.models

        return getattr(star.models, name)
    raise AttributeError(f"module 'star' has no attribute {name!r}")
