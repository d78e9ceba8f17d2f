"""Mamba-1 ops: selective scan and depthwise causal conv1d, with one-step updates for decoding, the MLP's
SwiGLU gate, and the blocks' LayerNorm with an output in the matmuls' dtype.

The functions here are the single entry points the models use; `impl` picks plain PyTorch
("ref", "chunked") or the Triton kernels in `star.ops.triton` ("auto" takes Triton on CUDA).
"""
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .layer_norm import layer_norm
from .selective_scan import selective_scan, selective_state_update
from .swiglu import swiglu

__all__ = ["causal_conv1d", "causal_conv1d_update", "layer_norm", "selective_scan", "selective_state_update",
           "swiglu"]
