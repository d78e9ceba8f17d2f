"""Depthwise causal conv1d + bias + SiLU in Triton, forward and backward, (batch, length, channels) layout.

Working in (b, l, d) directly saves the two transposes that torch's conv1d needs ((b, d, l) layout) and
fuses bias and SiLU. Each tap is a shifted (BLOCK_L, BLOCK_D) tile load that hits L1/L2 after the first.
Causal:      y[t] = sum_j w[:, j] x[t - (k-1-j)]
reverse:     y[t] = sum_j w[:, j] x[t + (k-1-j)]   (anti-causal mirror; no flipped copies)
The backward recomputes the pre-activation instead of storing it, takes its gradient once per time tile
(written to a scratch that the tile's K shifted dx reads come from, not recomputed per tap), and writes
weight/bias gradients as per-(batch, time segment) partials that torch sums in a fixed order (deterministic,
no atomics).
With a scan order (star.ops.orders) t counts scan positions and every load and store goes to row rows[t].
x is read through its batch and time strides (only the channel stride must be 1), so the mixer's x half of
in_proj's output is not copied; y and dx are contiguous. A shared input (one run of sequences that every weight
group filters, `shared=True`) is read once per group's run, never repeated; its dx sums the runs'.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.causal_conv1d import check_conv_inputs
from star.ops.groups import sequences_per_group, sum_per_group
from star.ops.orders import order_launch_args, order_table

FWD_TILES = dict(BLOCK_L=64, BLOCK_D=64, num_warps=4)
# The backward holds more tiles per program (the pre-activation gradient, dx, shifted reads): its own setting.
BWD_TILES = dict(BLOCK_L=64, BLOCK_D=64, num_warps=4)
SEGMENT_TILES = 8  # backward: time tiles per program, so weight-gradient partials stay small


@triton.jit
def _rows(rows_ptr, pos, valid, ORDER: tl.constexpr):
    """The time rows of scan positions `pos`: themselves, or their entries in the order table."""
    t = pos
    if ORDER:
        t = tl.load(rows_ptr + pos, mask=valid, other=0)
    return t


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, stride_xl, offs_t, offs_d, L, D, rows_ptr,
              K: tl.constexpr, STEP: tl.constexpr, HAS_BIAS: tl.constexpr, ORDER: tl.constexpr):
    """Pre-activation at times offs_t (fp32), taps outside [0, L) read as zero. x_ptr points at this program's
    sequence, whose rows are stride_xl apart."""
    mask_d = offs_d < D
    acc = tl.zeros((offs_t.shape[0], offs_d.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = offs_t + STEP * (K - 1 - j)
        valid = (src >= 0) & (src < L)
        m = valid[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + _rows(rows_ptr, src, valid, ORDER)[:, None] * stride_xl + offs_d[None, :], mask=m,
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * x
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, D, seq_per_group, order_ptr, seq_per_order, x_batch, stride_xb,
                     stride_xl,
                     K: tl.constexpr, STEP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     ORDER: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    row0 = pid_b * L
    rows_ptr = order_ptr + (pid_b // seq_per_order) * L
    x_ptr += (pid_b % x_batch) * stride_xb  # a shared input: every group's run reads the same x_batch sequences
    group = pid_b // seq_per_group  # grouped weights (groups, D, K): this sequence's set
    w_ptr, bias_ptr = w_ptr + group * D * K, bias_ptr + group * D
    offs_t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    y = _conv_pre(x_ptr, w_ptr, bias_ptr, stride_xl, offs_t, offs_d, L, D, rows_ptr, K, STEP, HAS_BIAS, ORDER)
    if SILU:
        y = y * tl.sigmoid(y)
    mask = (offs_t < L)[:, None] & (offs_d < D)[None, :]
    rows = _rows(rows_ptr, offs_t, offs_t < L, ORDER)
    tl.store(y_ptr + (row0 + rows)[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre(x_ptr, w_ptr, bias_ptr, dy_ptr, row0, stride_xl, offs_t, offs_d, L, D, rows_ptr,
              K: tl.constexpr, STEP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ORDER: tl.constexpr):
    """Gradient w.r.t. the pre-activation at times offs_t; zero outside [0, L)."""
    valid = (offs_t >= 0) & (offs_t < L)
    m = valid[:, None] & (offs_d < D)[None, :]
    dy = tl.load(dy_ptr + (row0 + _rows(rows_ptr, offs_t, valid, ORDER))[:, None] * D + offs_d[None, :], mask=m,
                 other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_ptr, w_ptr, bias_ptr, stride_xl, offs_t, offs_d, L, D, rows_ptr, K, STEP, HAS_BIAS, ORDER)
        sig = tl.sigmoid(pre)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dpre_ptr, halo_ptr, L, D,
                     seq_per_group, order_ptr, seq_per_order, x_batch, stride_xb, stride_xl,
                     K: tl.constexpr, STEP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     ORDER: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SEGMENT_TILES: tl.constexpr,
                     K_PAD: tl.constexpr):
    """Per time tile: the pre-activation gradient once, to scratch (dpre, by scan position) with the K_PAD
    positions past the tile on dx's side (halo, recomputed here rather than read from the neighbouring tile's
    program), then dx as K shifted reads of that scratch after a barrier (the shifts cross threads)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows_ptr = order_ptr + (pid_b // seq_per_order) * L
    group = pid_b // seq_per_group
    w_ptr, bias_ptr = w_ptr + group * D * K, bias_ptr + group * D
    pid_seg = tl.program_id(1)
    row0 = pid_b * L
    x_ptr += (pid_b % x_batch) * stride_xb
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    taps = tl.arange(0, K_PAD)
    dw_acc = tl.zeros((BLOCK_D, K_PAD), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first_tile = pid_seg * SEGMENT_TILES
    n_tiles = tl.cdiv(L, BLOCK_L)
    for tile in range(first_tile, tl.minimum(first_tile + SEGMENT_TILES, n_tiles)):
        start = tile * BLOCK_L
        offs_t = start + tl.arange(0, BLOCK_L)
        mask = (offs_t < L)[:, None] & mask_d[None, :]
        dpre = _grad_pre(x_ptr, w_ptr, bias_ptr, dy_ptr, row0, stride_xl, offs_t, offs_d, L, D, rows_ptr, K, STEP,
                         HAS_BIAS, SILU, ORDER)
        # dx[s] = sum_j w_j dpre[s - shift_j], shift_j = STEP (K-1-j): past the tile's end (causal, STEP = -1) or
        # before its start (reverse). halo_t are those K_PAD positions, outside [0, L) zero.
        halo0 = start + BLOCK_L if STEP < 0 else start - K_PAD
        halo_t = halo0 + taps
        dhalo = _grad_pre(x_ptr, w_ptr, bias_ptr, dy_ptr, row0, stride_xl, halo_t, offs_d, L, D, rows_ptr, K, STEP,
                          HAS_BIAS, SILU, ORDER)
        dpre_base = dpre_ptr + row0 * D
        halo_base = halo_ptr + (pid_b * n_tiles + tile) * K_PAD * D
        tl.store(dpre_base + offs_t[:, None] * D + offs_d[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        tl.store(halo_base + taps[:, None] * D + offs_d[None, :], dhalo.to(halo_ptr.dtype.element_ty),
                 mask=mask_d[None, :])
        tl.debug_barrier()  # every thread's dpre and halo are written before any thread reads them shifted
        dbias_acc += tl.sum(dpre, axis=0)
        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            shift = STEP * (K - 1 - j)
            w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
            src = offs_t - shift
            in_tile = (src >= start) & (src < start + BLOCK_L)
            ptrs = tl.where(in_tile[:, None], dpre_base + src[:, None] * D, halo_base + (src - halo0)[:, None] * D)
            dpre_j = tl.load(ptrs + offs_d[None, :], mask=mask & (~in_tile | (src < L))[:, None],
                             other=0.0).to(tl.float32)
            dx += w[None, :] * dpre_j
            # dw_j gets dpre[t] * x[t + shift]
            src = offs_t + shift
            valid = (src >= 0) & (src < L)
            m = valid[:, None] & mask_d[None, :]
            x = tl.load(x_ptr + _rows(rows_ptr, src, valid, ORDER)[:, None] * stride_xl + offs_d[None, :], mask=m,
                        other=0.0).to(tl.float32)
            dw_j = tl.sum(dpre * x, axis=0)
            dw_acc += tl.where(taps[None, :] == j, dw_j[:, None], 0.0)
        rows = _rows(rows_ptr, offs_t, offs_t < L, ORDER)
        tl.store(dx_ptr + (row0 + rows)[:, None] * D + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = pid_b * tl.num_programs(1) + pid_seg
    tl.store(dw_part_ptr + (part * D + offs_d[:, None]) * K + taps[None, :], dw_acc,
             mask=mask_d[:, None] & (taps < K)[None, :])
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * D + offs_d, dbias_acc, mask=mask_d)


def _flags(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], reverse: bool,
           order: Optional[Tensor], out: Tensor) -> dict:
    """The kernels' arguments besides the tensors and sizes, for input x and the output (y or dy) `out`: a
    shared x holds fewer sequences than out, one run of them per weight group."""
    return dict(K=weight.shape[-1], STEP=1 if reverse else -1, HAS_BIAS=bias is not None, SILU=activation == "silu",
                ORDER=order is not None, seq_per_group=sequences_per_group(out, weight),
                **order_launch_args(x, order, out.shape[0]),
                x_batch=x.shape[0], stride_xb=x.stride(0), stride_xl=x.stride(1))


def _out_batch(x: Tensor, weight: Tensor, shared: bool) -> int:
    """Output sequences: x's, or with a shared input one run of them per weight group."""
    return x.shape[0] * weight.shape[0] if shared else x.shape[0]


@torch.library.custom_op("star::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                       reverse: bool, order: Optional[Tensor], shared: bool) -> Tensor:
    _, l, d = x.shape
    b = _out_batch(x, weight, shared)
    y = x.new_empty((b, l, d))
    grid = (b, triton.cdiv(l, FWD_TILES["BLOCK_L"]), triton.cdiv(d, FWD_TILES["BLOCK_D"]))
    _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight, y, l, d,
                           **_flags(x, weight, bias, activation, reverse, order, y), **FWD_TILES)
    return y


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, activation, reverse, order, shared):
    return x.new_empty((_out_batch(x, weight, shared), *x.shape[1:]))


@torch.library.custom_op("star::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                       reverse: bool, order: Optional[Tensor], shared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx, dweight, dbias (dbias empty when there is no bias). A shared input's dx sums its runs'."""
    b, l, d = dy.shape
    k = weight.shape[-1]
    block_l, block_d = BWD_TILES["BLOCK_L"], BWD_TILES["BLOCK_D"]
    n_segments = triton.cdiv(l, block_l * SEGMENT_TILES)
    dx = x.new_empty((b, l, d))
    dw_part = x.new_empty((b * n_segments, d, k), dtype=torch.float32)
    dbias_part = x.new_empty((b * n_segments, d) if bias is not None else (0,), dtype=torch.float32)
    k_pad = triton.next_power_of_2(k)
    dpre = x.new_empty((b, l, d))  # the pre-activation gradient in dx's dtype, and each tile's halo of it
    halo = x.new_empty((b, triton.cdiv(l, block_l), k_pad, d))
    grid = (b, n_segments, triton.cdiv(d, block_d))
    _conv_bwd_kernel[grid](x, weight, bias if bias is not None else weight, dy, dx, dw_part, dbias_part, dpre, halo,
                           l, d,
                           **_flags(x, weight, bias, activation, reverse, order, dy),
                           SEGMENT_TILES=SEGMENT_TILES, K_PAD=k_pad, **BWD_TILES)
    # parts are ordered (batch, segment), so each group's parts are one contiguous run
    groups = b // sequences_per_group(dy, weight)
    dbias = sum_per_group(dbias_part, groups).reshape(bias.shape).to(bias.dtype) if bias is not None \
        else x.new_empty(0)
    if shared:
        dx = dx.view(groups, *x.shape).sum(0)
    return dx, sum_per_group(dw_part, groups).reshape(weight.shape).to(weight.dtype), dbias


@_causal_conv1d_bwd.register_fake
def _(dy, x, weight, bias, activation, reverse, order, shared):
    return x.new_empty(x.shape), torch.empty_like(weight), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, reverse, order, shared = inputs
    ctx.save_for_backward(x, weight, bias, order)
    ctx.activation, ctx.reverse, ctx.shared = activation, reverse, shared


def _backward(ctx, dy):
    x, weight, bias, order = ctx.saved_tensors
    dx, dweight, dbias = _causal_conv1d_bwd(dy.contiguous(), x, weight, bias, ctx.activation, ctx.reverse, order,
                                            ctx.shared)
    return dx, dweight, dbias if bias is not None else None, None, None, None, None


_causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None, reverse: bool = False,
                         order: Optional[Tensor] = None, shared: bool = False) -> Tensor:
    """Depthwise causal conv1d on (b, l, d) with fused bias and optional SiLU; output in x's dtype. Grouped
    weights (groups, d, k), bias (groups, d), scan orders and a shared input as in `star.ops.causal_conv1d`,
    whose input checks it runs."""
    check_conv_inputs(x, weight, bias, activation, order, shared)
    return causal_conv1d_triton_unchecked(x, weight, bias, activation, reverse, order, shared)


def check_kernel_size(weight: Tensor) -> None:
    """The kernels' own limit on the conv's kernel size (its taps unroll)."""
    if not 1 <= weight.shape[-1] <= 16:
        raise ValueError(f"kernel_size must be in [1, 16] for the Triton conv, got {weight.shape[-1]}")


def causal_conv1d_triton_unchecked(x, weight, bias=None, activation=None, reverse=False, order=None,
                                   shared=False) -> Tensor:
    """`causal_conv1d_triton` without the op's input checks: the op table's Triton entry, which
    `star.ops.causal_conv1d` calls once it has checked the inputs itself. The kernel's own limit on the
    kernel size is checked here, on every path."""
    check_kernel_size(weight)
    bias = bias.contiguous() if bias is not None else None
    order = order_table(order) if order is not None else None
    x = x if x.stride(-1) == 1 else x.contiguous()  # rows may be strided (the mixer's (x, z) split): not copied
    return _causal_conv1d_fwd(x, weight.contiguous(), bias, activation, reverse, order, shared)
