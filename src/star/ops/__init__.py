"""Mamba-1 ops: selective scan and depthwise causal conv1d, with one-step updates for decoding, and the
MLP's SwiGLU gate.

The functions here are the single entry points the models use; `impl` picks plain PyTorch
("ref", "chunked") or the Triton kernels in `star.ops.triton` ("auto" takes Triton on CUDA).
"""
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .selective_scan import selective_scan, selective_state_update
from .swiglu import swiglu

__all__ = ["causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update", "swiglu"]
