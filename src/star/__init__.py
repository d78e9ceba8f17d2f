"""star: STAR autoregressive pretraining of Vision Mamba, and fine-tuning for classification."""

__version__ = "0.1.0"
