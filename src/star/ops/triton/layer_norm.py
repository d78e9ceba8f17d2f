"""LayerNorm in Triton, forward and backward (star.ops.layer_norm), rows of (M, d).

Forward: one program per BLOCK_M rows, the whole row in one tile: mean and 1/std in fp32 (kept for backward),
the output stored in the requested dtype. Backward: one program per ROWS rows, walked BLOCK_M at a time; it
writes dx (x's dtype) and keeps its rows' sums of dy * xhat and dy (the weight and bias gradients) in
registers, stored once as a (programs, d) fp32 partial that torch sums afterwards: no atomics, deterministic.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.layer_norm import check_layer_norm_inputs

ROWS = 64  # rows per backward program (the partials' length is M / ROWS)


@triton.jit
def _rows_tile(row0, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    return rows, cols, mask_m, mask_m[:, None] & (cols < N)[None, :], rows[:, None] * N + cols[None, :]


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows, cols, mask_m, mask, offs = _rows_tile(tl.program_id(0).to(tl.int64) * BLOCK_M, M, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None] * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_m)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _ln_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, M, N,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_M):
        rows, _cols, mask_m, mask, offs = _rows_tile(pid.to(tl.int64) * ROWS + start, M, N, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=cols < N)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * N + cols, db, mask=cols < N)


def _tiles(n: int) -> dict:
    """The whole row in one tile; about 4k elements per tile (rows of a block), 4 warps per program, 8 above 4k."""
    block_n = triton.next_power_of_2(n)
    return dict(BLOCK_N=block_n, BLOCK_M=max(1, min(16, 4096 // block_n)), num_warps=8 if block_n > 4096 else 4)


@torch.library.custom_op("star::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                    out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    m = x.numel() // n
    y = x.new_empty(x.shape, dtype=out_dtype)
    mean, rstd = (x.new_empty(x.shape[:-1], dtype=torch.float32) for _ in range(2))
    tiles = _tiles(n)
    _ln_fwd_kernel[(triton.cdiv(m, tiles["BLOCK_M"]),)](x, weight, weight if bias is None else bias, y, mean, rstd,
                                                         m, n, eps, HAS_BIAS=bias is not None, **tiles)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("star::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx, dweight and dbias (empty without a bias)."""
    n = x.shape[-1]
    m = x.numel() // n
    programs = triton.cdiv(m, ROWS)
    dx = torch.empty_like(x)
    dw_part = x.new_empty((programs, n), dtype=torch.float32)
    db_part = x.new_empty((programs, n) if has_bias else (0,), dtype=torch.float32)
    tiles = _tiles(n)
    tiles["BLOCK_M"] = min(tiles["BLOCK_M"], ROWS)
    _ln_bwd_kernel[(programs,)](x, weight, dy, mean, rstd, dx, dw_part, db_part, m, n, ROWS=ROWS,
                                HAS_BIAS=has_bias, **tiles)
    db = db_part.sum(0).to(weight.dtype) if has_bias else x.new_empty(0)
    return dx, dw_part.sum(0).to(weight.dtype), db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight) if has_bias else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """`star.ops.layer_norm` in Triton (fp32 math); checks its inputs as the op does."""
    check_layer_norm_inputs(x, weight, bias)
    return layer_norm_triton_unchecked(x, weight, bias, eps, out_dtype or x.dtype)


def layer_norm_triton_unchecked(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                                out_dtype: torch.dtype) -> Tensor:
    """`layer_norm_triton` without the input checks: the op table's Triton entry."""
    bias = None if bias is None else bias.contiguous()
    return _layer_norm_fwd(x.contiguous(), weight.contiguous(), bias, eps, out_dtype)[0]
