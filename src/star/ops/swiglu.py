"""The SwiGLU gate of the MambaMLP block's MLP, on the packed output of its two input projections.

    y = silu(g) * v,   [g, v] = gx split in halves along the last dim

With g and v from one packed matmul, the gate is one op that keeps only gx for backward (recomputing silu
there), where the unfused form keeps g, silu(g), v and the product: one (tokens, hidden) activation less per
block, and on a GPU one kernel each way instead of several elementwise ones.
"""
import torch
import torch.nn.functional as F

from .impls import implementation, register_op


def swiglu_ref(gx: torch.Tensor) -> torch.Tensor:
    g, v = gx.chunk(2, dim=-1)
    return F.silu(g) * v


def swiglu(gx: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(g) * v of gx = [g, v] (..., 2 * hidden) -> (..., hidden), in gx's dtype. impl as in
    `star.ops.selective_scan` ("auto": Triton for CUDA tensors)."""
    check_swiglu_inputs(gx)
    return implementation("swiglu", impl, gx)(gx)


def check_swiglu_inputs(gx) -> None:
    if not isinstance(gx, torch.Tensor) or gx.dim() < 1 or gx.shape[-1] % 2 or not gx.is_floating_point():
        raise ValueError(f"gx must be a floating-point (..., 2 * hidden) tensor, got "
                         f"{tuple(gx.shape) if isinstance(gx, torch.Tensor) else type(gx).__name__}"
                         f"{'' if not isinstance(gx, torch.Tensor) else ' of ' + str(gx.dtype)}")


register_op("swiglu", ref=swiglu_ref, chunked=swiglu_ref, triton="swiglu_triton_unchecked")
