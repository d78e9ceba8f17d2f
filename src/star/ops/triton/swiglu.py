"""SwiGLU gate silu(g) * v of a packed gx = [g, v] in Triton, forward and backward (star.ops.swiglu).

One program per (block of rows, block of hidden channels); the backward recomputes silu(g) from gx and writes
dg and dv into one packed gradient, which the packed input projection's backward takes as it is.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.swiglu import check_swiglu_inputs

BLOCK_M = 16
BLOCK_H = 256


@triton.jit
def _tile(M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows, cols, (rows < M)[:, None] & (cols < H)[None, :]


@triton.jit
def _swiglu_fwd_kernel(gx_ptr, y_ptr, M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask = _tile(M, H, BLOCK_M, BLOCK_H)
    g_offs = rows[:, None] * (2 * H) + cols[None, :]
    g = tl.load(gx_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(gx_ptr + g_offs + H, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * v
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gx_ptr, dy_ptr, dgx_ptr, M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask = _tile(M, H, BLOCK_M, BLOCK_H)
    g_offs = rows[:, None] * (2 * H) + cols[None, :]
    g = tl.load(gx_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(gx_ptr + g_offs + H, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dy * v * sig * (1.0 + g * (1.0 - sig))
    dv = dy * g * sig
    tl.store(dgx_ptr + g_offs, dg.to(dgx_ptr.dtype.element_ty), mask=mask)
    tl.store(dgx_ptr + g_offs + H, dv.to(dgx_ptr.dtype.element_ty), mask=mask)


def _grid(m: int, h: int):
    return triton.cdiv(m, BLOCK_M), triton.cdiv(h, BLOCK_H)


@torch.library.custom_op("star::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gx: Tensor) -> Tensor:
    h = gx.shape[-1] // 2
    y = gx.new_empty((*gx.shape[:-1], h))
    m = gx.numel() // (2 * h)
    _swiglu_fwd_kernel[_grid(m, h)](gx, y, m, h, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=4)
    return y


@_swiglu_fwd.register_fake
def _(gx):
    return gx.new_empty((*gx.shape[:-1], gx.shape[-1] // 2))


@torch.library.custom_op("star::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: Tensor, gx: Tensor) -> Tensor:
    h = gx.shape[-1] // 2
    dgx = torch.empty_like(gx)
    m = gx.numel() // (2 * h)
    _swiglu_bwd_kernel[_grid(m, h)](gx, dy, dgx, m, h, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=4)
    return dgx


@_swiglu_bwd.register_fake
def _(dy, gx):
    return torch.empty_like(gx)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (gx,) = ctx.saved_tensors
    return _swiglu_bwd(dy.contiguous(), gx)


_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu_triton(gx: Tensor) -> Tensor:
    """`star.ops.swiglu` in Triton: output in gx's dtype, fp32 math; checks its input as the op does."""
    check_swiglu_inputs(gx)
    return swiglu_triton_unchecked(gx)


def swiglu_triton_unchecked(gx: Tensor) -> Tensor:
    """`swiglu_triton` without the input check: the op table's Triton entry."""
    return _swiglu_fwd(gx.contiguous())
