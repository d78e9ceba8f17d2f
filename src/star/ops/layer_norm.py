"""LayerNorm over the last dim that writes its output in the dtype the next op computes in.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (fp32 math), stored as `out_dtype`

A block's residual stream is fp32 while its matmuls run in bf16 under autocast. nn.LayerNorm there computes in
fp32, writes an fp32 output and the next matmul casts it to bf16: two passes over the activation and a copy
kernel, and the backward receives a bf16 gradient that it casts back to fp32. With `out_dtype` the norm writes
the bf16 output itself and its backward reads the bf16 gradient as it is (one kernel each way on a GPU).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .impls import check_shape, implementation, register_op


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 math for half inputs, float64 stays exact
    bias = None if bias is None else bias.to(dtype)
    return F.layer_norm(x.to(dtype), x.shape[-1:], weight.to(dtype), bias, eps).to(out_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> torch.Tensor:
    """LayerNorm of x (..., d) with weight and bias (d,) (bias may be None), output in `out_dtype` (default:
    x's dtype). impl as in `star.ops.selective_scan` ("auto": Triton for CUDA tensors)."""
    check_layer_norm_inputs(x, weight, bias)
    return implementation("layer_norm", impl, x)(x, weight, bias, eps, out_dtype or x.dtype)


def check_layer_norm_inputs(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point() or x.shape[-1] == 0:
        raise ValueError(f"x must be a floating-point (..., d) tensor with d > 0, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_shape("weight", weight, x.device, d=x.shape[-1])
    if bias is not None:
        check_shape("bias", bias, x.device, d=x.shape[-1])


register_op("layer_norm", ref=layer_norm_ref, chunked=layer_norm_ref, triton="layer_norm_triton_unchecked")
