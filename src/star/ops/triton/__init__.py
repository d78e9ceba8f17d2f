"""Triton kernels for the Mamba block: selective scan, depthwise causal conv1d, the SwiGLU gate and LayerNorm
(forward and backward).

The entry points are autograd-aware wrappers around `torch.library` custom ops, so torch.compile and
CUDA graphs capture them; they also run on CPU tensors under TRITON_INTERPRET=1 (for tests).
"""
from .causal_conv1d import causal_conv1d_triton, causal_conv1d_triton_unchecked
from .layer_norm import layer_norm_triton, layer_norm_triton_unchecked
from .mixer_scan import mixer_scan
from .selective_scan import selective_scan_triton, selective_scan_triton_unchecked
from .swiglu import swiglu_triton, swiglu_triton_unchecked

__all__ = ["causal_conv1d_triton", "causal_conv1d_triton_unchecked", "layer_norm_triton", "layer_norm_triton_unchecked",
           "mixer_scan", "selective_scan_triton", "selective_scan_triton_unchecked", "swiglu_triton",
           "swiglu_triton_unchecked"]
