"""Selective scan (Mamba-1 S6) in Triton, forward and backward, (batch, length, channels) layout.

One program owns one (batch, block of channels) pair and walks the sequence in chunks of CHUNK steps.
A chunk is a (CHUNK, N, BLOCK_D) fp32 tile: channels are the thread axis, time and state sit inside each
thread, so each chunk's loads are one coalesced (CHUNK, BLOCK_D) tile, the recurrence
h_t = a_t * h_{t-1} + b_t is CHUNK unrolled FMAs per element, and sums over the state stay in-thread.

Memory traffic is kept near the floor by saving the state only every SEGMENT = CHUNK * SEG_CHUNKS steps
(fp32, (b, n_segments, n, d): 64 / SEGMENT bytes per token-channel). The backward walks the segments
from last to first, each in two passes:
  1. forward over the segment from its checkpoint: stores the state entering each chunk into a small
     per-program scratch (L2-resident), and uses the states it has in hand for dC;
  2. backward over the segment's chunks: reloads the chunk's entering state, recomputes the chunk
     (one exp per element), takes dz and dD from the recomputed states, runs the adjoint
     g_t = a_{t+1} g_{t+1} + C_t dy_t as a reverse scan, and reads du, d_delta, dB and dA off (h_t, g_t).
     a_{t+1} comes from the chunk's own decay tile, carried inside the reverse scan, and from the
     following chunk, so no second exp is needed.
Every loop over chunks issues the next chunk's loads before the current chunk's math (software pipelining
by hand; the kernels were latency bound, each chunk waiting for its own loads): the forward's five tiles, the
backward's six (u, delta, z, dy, B, C) and, in pass 2, the next chunk's entering state from the scratch.
Nothing is accumulated with atomics: dA, dD and d_delta_bias are per-batch partials and dB, dC are
per-channel-block partials, summed afterwards by torch in a fixed order, so gradients are deterministic.
u, delta and z may be strided views (only the channel stride must be 1), which saves the copies of the
mixer's (x, z) split; z may also be one run of gates shared by every parameter group's run (read in place,
its dz the sum of the runs'). reverse=True, and a scan order (star.ops.orders, a table of rows), only change which
time row a scan position reads and writes.

Parallel over time: a long sequence in a small batch is cut into parts that run as programs of their own
(star.ops.triton.selective_scan_parts); the kernels here then start each part from its true entering state
(HAS_INIT). The pieces every kernel shares are in star.ops.triton.selective_scan_chunks.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.groups import sequences_per_group, sum_per_group
from star.ops.orders import order_table
from star.ops.selective_scan import check_scan_inputs
from star.ops.triton.selective_scan_chunks import (CUDA_CONFIG, LOG2E, _channel_block, _chunk_bc, _chunk_dy,
                                                   _chunk_index, _chunk_loads, _chunk_states, _chunk_values, _config,
                                                   _empty_if_none, _gate, _launch_args, _load_params, _n_segments,
                                                   _order_rows, _row, _set_row, _shared_z, _store_channel_sum)
from star.ops.triton.selective_scan_parts import _entering, _part_chunks, _part_state, _parts

# CUDA_CONFIG is the scan's tile setting: the benchmarks read and tune it here (scan_variants.py in every tree)
__all__ = ["CUDA_CONFIG", "selective_scan_triton", "selective_scan_triton_unchecked"]


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, ckpt_ptr, init_ptr,
    L, D, n_segments, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl, z_batch, order_ptr, seq_per_order,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ORDER: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_INIT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(2)
    rows = _order_rows(order_ptr, pid_b, seq_per_order, L, ORDER)
    z_ptr = _shared_z(z_ptr, pid_b, z_batch, stride_zb)
    offs_d, offs_n, mask_d, mask_n, mask_nd = _channel_block(tl.program_id(1), D, N, N_PAD, BLOCK_D)
    A2, bias, Dv = _load_params(A_ptr, D_ptr, bias_ptr, pid_b // seq_per_group, offs_d, offs_n, mask_d, mask_nd, D,
                                N, BLOCK_D, HAS_D, HAS_BIAS)
    ckpt_base = ckpt_ptr + pid_b * n_segments * N * D + offs_n[:, None] * D + offs_d[None, :]
    first, end = _part_chunks(pid_p, part_segments, L, CHUNK, SEG_CHUNKS)

    if HAS_INIT:  # the true state entering this part (time-parallel launch)
        h = tl.load(_part_state(init_ptr, pid_b, pid_p, tl.num_programs(2), offs_n, offs_d, D, N), mask=mask_nd,
                    other=0.0)
    else:
        h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    # Software pipelining by hand: chunk c+1's loads are issued before chunk c's math, so their latency
    # overlaps it (the loop would otherwise wait on every chunk's loads). Past the end they are all masked.
    u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first, pid_b, L, offs_d, mask_d, stride_ub,
                                              stride_ul, stride_deltab, stride_deltal, stride_zb, stride_zl,
                                              CHUNK, REVERSE, HAS_Z, rows, ORDER)
    B_next, C_next = _chunk_bc(B_ptr, C_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
    for chunk in range(first, end):
        if SAVE_STATES:
            if chunk % SEG_CHUNKS == 0:
                tl.store(ckpt_base + (chunk // SEG_CHUNKS) * N * D, h, mask=mask_nd)
        u, delta, Bt, Ct, z = u_next, delta_next, B_next, C_next, z_next
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, chunk + 1, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
        B_next, C_next = _chunk_bc(B_ptr, C_ptr, chunk + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        t, mask_t, mask, offs = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
        u, delta, _, Bt, Ct, z = _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
        _, _, hs, h = _chunk_states(h, delta, u, Bt, A2, CHUNK)
        y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
        if HAS_Z:
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, ckpt_ptr, init_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
    L, D, n_segments, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl, z_batch, order_ptr, seq_per_order,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ORDER: tl.constexpr, PRECISION: tl.constexpr, HAS_INIT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = _order_rows(order_ptr, pid_b, seq_per_order, L, ORDER)
    z_ptr = _shared_z(z_ptr, pid_b, z_batch, stride_zb)
    pid_p = tl.program_id(2)
    n_dblocks = tl.num_programs(1)
    n_parts = tl.num_programs(2)
    pid_bp = pid_b * n_parts + pid_p  # partials of dA, dD and the dt bias are per (sequence, part)
    offs_d, offs_n, mask_d, mask_n, mask_nd = _channel_block(pid_d, D, N, N_PAD, BLOCK_D)
    A2, bias, Dv = _load_params(A_ptr, D_ptr, bias_ptr, pid_b // seq_per_group, offs_d, offs_n, mask_d, mask_nd, D,
                                N, BLOCK_D, HAS_D, HAS_BIAS)
    ckpt_base = ckpt_ptr + pid_b * n_segments * N * D + offs_n[:, None] * D + offs_d[None, :]
    scratch_base = (scratch_ptr + ((pid_b * n_dblocks + pid_d) * n_parts + pid_p) * SEG_CHUNKS * N_PAD * BLOCK_D
                    + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :])
    part_bc_base = (pid_b * n_dblocks + pid_d) * L
    n_chunks = tl.cdiv(L, CHUNK)
    first_seg = pid_p * part_segments
    end_seg = tl.minimum(first_seg + part_segments, n_segments)

    # a_{t+1} g_{t+1} at the step after the current chunk: zero past the sequence end, else the part's true carry
    if HAS_INIT:
        carry = tl.load(_part_state(init_ptr, pid_b, pid_p, n_parts, offs_n, offs_d, D, N), mask=mask_nd, other=0.0)
    else:
        carry = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dA_acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for step in range(end_seg - first_seg):
        seg = end_seg - 1 - step
        first = seg * SEG_CHUNKS
        seg_chunks = tl.minimum(SEG_CHUNKS, n_chunks - first)

        # Pass 1, forward: the state entering each chunk goes to scratch; dC uses the states. (dC is taken here,
        # not in pass 2: with no matrix product in this pass, Triton 3.6's layout pass fails on the kernel.)
        # Each pass issues the next chunk's loads before this chunk's math, as the forward kernel does.
        h = tl.load(ckpt_base + seg * N * D, mask=mask_nd, other=0.0)
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
        dy_next = _chunk_dy(dy_ptr, first, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
        B_next, C_next = _chunk_bc(B_ptr, C_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        for k in range(seg_chunks):
            tl.store(scratch_base + k * N_PAD * BLOCK_D, h)
            u, delta, z, dy = u_next, delta_next, z_next, dy_next
            u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first + k + 1, pid_b, L, offs_d,
                                                      mask_d, stride_ub, stride_ul, stride_deltab, stride_deltal,
                                                      stride_zb, stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
            dy_next = _chunk_dy(dy_ptr, first + k + 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
            Bt, Ct = B_next, C_next
            B_next, C_next = _chunk_bc(B_ptr, C_ptr, first + k + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows,
                                       ORDER)
            t, mask_t, mask, offs = _chunk_index(first + k, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
            u, delta, _, Bt, Ct, z = _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
            dy = dy.to(tl.float32)
            _, _, hs, h = _chunk_states(h, delta, u, Bt, A2, CHUNK)
            if HAS_Z:
                dy, _ = _gate(z, dy)
            _store_channel_sum(dC_part_ptr, hs * dy[:, None, :], t, part_bc_base, mask_t, N, N_PAD, CHUNK, BLOCK_D,
                               PRECISION)

        # Pass 2, backward over the same chunks: recompute each from its entering state, then the adjoint.
        last = first + seg_chunks - 1
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, last, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
        dy_next = _chunk_dy(dy_ptr, last, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
        B_next, C_next = _chunk_bc(B_ptr, C_ptr, last, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        h0_next = tl.load(scratch_base + (seg_chunks - 1) * N_PAD * BLOCK_D)
        for j in range(seg_chunks):
            k = seg_chunks - 1 - j
            h0 = h0_next
            h0_next = tl.load(scratch_base + tl.maximum(k - 1, 0) * N_PAD * BLOCK_D)
            u, delta, z, dy = u_next, delta_next, z_next, dy_next
            # chunk first - 1 is the next segment's (or, before the sequence start, masked): loaded, not used
            u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first + k - 1, pid_b, L, offs_d,
                                                      mask_d, stride_ub, stride_ul, stride_deltab, stride_deltal,
                                                      stride_zb, stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
            Bt, Ct = B_next, C_next
            B_next, C_next = _chunk_bc(B_ptr, C_ptr, first + k - 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows,
                                       ORDER)
            dy_next = _chunk_dy(dy_ptr, first + k - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
            t, mask_t, mask, offs = _chunk_index(first + k, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
            u, delta, dsoftplus, Bt, Ct, z = _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
            dy = dy.to(tl.float32)
            a, b, hs, _ = _chunk_states(h0, delta, u, Bt, A2, CHUNK)
            if HAS_Z:
                y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
                dy, dy_dsilu = _gate(z, dy)
                tl.store(dz_ptr + offs, (dy_dsilu * y).to(dz_ptr.dtype.element_ty), mask=mask)
            dD_acc += tl.sum(dy * u, axis=0)

            # Adjoint, last step first: g_t = C_t dy_t + a_{t+1} g_{t+1}; `carry` is a_{t+1} g_{t+1}.
            c = dy[:, None, :] * Ct[:, :, None]
            g = tl.zeros_like(c)
            for i in tl.static_range(CHUNK - 1, -1, -1):
                g_i = _row(c, i, CHUNK) + carry
                g = _set_row(g, i, g_i, CHUNK)
                carry = _row(a, i, CHUNK) * g_i

            g_decayed = g * (hs - b)  # g_t * a_t h_{t-1}
            gB_sum = tl.sum(g * Bt[:, :, None], axis=1)
            ddelta = tl.sum(g_decayed * A2[None, :, :], axis=1) * (1.0 / LOG2E) + gB_sum * u
            ddelta = tl.where(mask, ddelta * dsoftplus, 0.0)
            du = gB_sum * delta + Dv[None, :] * dy
            dA_acc += tl.sum(g_decayed * delta[:, None, :], axis=0)
            dbias_acc += tl.sum(ddelta, axis=0)
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)
            _store_channel_sum(dB_part_ptr, g * (delta * u)[:, None, :], t, part_bc_base, mask_t, N, N_PAD, CHUNK,
                               BLOCK_D, PRECISION)

    tl.store(dA_part_ptr + pid_bp * N * D + offs_n[:, None] * D + offs_d[None, :], dA_acc, mask=mask_nd)
    if HAS_D:
        tl.store(dD_part_ptr + pid_bp * D + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_bp * D + offs_d, dbias_acc, mask=mask_d)


def _flags(D, z, delta_bias, delta_softplus, reverse, order) -> dict:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, REVERSE=reverse, ORDER=order is not None)


@torch.library.custom_op("star::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], order: Optional[Tensor],
    delta_softplus: bool, reverse: bool, save_states: bool,
) -> tuple[Tensor, Tensor]:
    b, l, d = u.shape
    n = A.shape[-1]
    n_segments = _n_segments(l, u)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, order)
    parts, part_segments = _parts(u, d, "fwd")
    entering = _entering(u, delta, A, B, C, z, delta_bias, order, None, flags, parts, part_segments, "fwd") \
        if parts > 1 else u.new_empty(0)
    y = u.new_empty((b, l, d))
    ckpt = u.new_empty((b, n_segments, n, d) if save_states else (0,), dtype=torch.float32)
    _scan_fwd_kernel[(b, triton.cdiv(d, _config(u)["fwd"]["BLOCK_D"]), parts)](
        u, delta, A, B, C, _empty_if_none(D, u), _empty_if_none(z, u), _empty_if_none(delta_bias, u), y, ckpt,
        entering, l, d, n_segments, part_segments, sequences_per_group(u, A),
        **_launch_args(u, A, delta, z, "fwd", order),
        **flags, SAVE_STATES=save_states, HAS_INIT=parts > 1,
    )
    return y, ckpt


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, order, delta_softplus, reverse, save_states):
    b, l, d = u.shape
    ckpt_shape = (b, _n_segments(l, u), A.shape[-1], d) if save_states else (0,)
    return u.new_empty((b, l, d)), u.new_empty(ckpt_shape, dtype=torch.float32)


@torch.library.custom_op("star::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], order: Optional[Tensor], ckpt: Tensor,
    delta_softplus: bool, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns du, ddelta, dA, dB, dC, dD, dz, d_delta_bias; the last three are empty when unused."""
    b, l, d = u.shape
    n = A.shape[-1]
    tiles = _config(u)["bwd"]
    n_dblocks = triton.cdiv(d, tiles["BLOCK_D"])
    f32 = dict(dtype=torch.float32)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, order)
    parts, part_segments = _parts(u, d, "bwd")
    entering = _entering(u, delta, A, B, C, z, delta_bias, order, dy, flags, parts, part_segments, "bwd") \
        if parts > 1 else u.new_empty(0)
    du, ddelta = u.new_empty((b, l, d)), delta.new_empty((b, l, d))
    dz = z.new_empty((b, l, d)) if z is not None else u.new_empty(0)
    scratch = u.new_empty((b, n_dblocks, parts, _config(u)["SEGMENT"] // tiles["CHUNK"], triton.next_power_of_2(n),
                           tiles["BLOCK_D"]), **f32)
    dA_part = u.new_empty((b, parts, n, d), **f32)
    dB_part = u.new_empty((b, n_dblocks, l, n), **f32)
    dC_part = u.new_empty((b, n_dblocks, l, n), **f32)
    dD_part = u.new_empty((b, parts, d) if D is not None else (0,), **f32)
    dbias_part = u.new_empty((b, parts, d) if delta_bias is not None else (0,), **f32)
    _scan_bwd_kernel[(b, n_dblocks, parts)](
        u, delta, A, B, C, _empty_if_none(D, u), _empty_if_none(z, u), _empty_if_none(delta_bias, u),
        dy, ckpt, entering, scratch, du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
        l, d, _n_segments(l, u), part_segments, sequences_per_group(u, A),
        **_launch_args(u, A, delta, z, "bwd", order),
        **flags, PRECISION="tf32x3" if u.dtype == torch.float32 else "tf32", HAS_INIT=parts > 1,
    )
    groups = b // sequences_per_group(u, A)
    if z is not None and z.shape[0] != b:  # a gate shared by every group's run gets the sum of the runs' dz
        dz = dz.view(b // z.shape[0], *z.shape).sum(0)
    dA_part, dD_part, dbias_part = (x.sum(1) if x.numel() else x for x in (dA_part, dD_part, dbias_part))
    dA = sum_per_group(dA_part, groups).transpose(-1, -2).reshape(A.shape).contiguous().to(A.dtype)  # A's layout
    dB = dB_part.sum(1).to(B.dtype)
    dC = dC_part.sum(1).to(C.dtype)
    dD = sum_per_group(dD_part, groups).reshape(D.shape).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = sum_per_group(dbias_part, groups).reshape(delta_bias.shape).to(delta_bias.dtype) \
        if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


@_selective_scan_bwd.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, order, ckpt, delta_softplus, reverse):
    empty = u.new_empty(0)
    b, l, d = u.shape
    return (
        u.new_empty((b, l, d)), delta.new_empty((b, l, d)), torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B), torch.empty_like(C),
        empty if D is None else torch.empty_like(D), empty if z is None else z.new_empty(z.shape),
        empty if delta_bias is None else torch.empty_like(delta_bias),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, order, delta_softplus, reverse, save_states = inputs
    if not save_states:
        raise RuntimeError("selective_scan_triton: backward needs the forward to run with save_states=True")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, order, output[1])
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse


def _backward(ctx, dy, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, order, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
        dy.contiguous(), u, delta, A, B, C, D, z, delta_bias, order, ckpt, ctx.delta_softplus, ctx.reverse
    )
    return (
        du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
        dbias if delta_bias is not None else None, None, None, None, None,
    )


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _channels_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    """(b, l, d) activations are read through their batch/time strides; only the channel stride must be 1."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def kernel_layout(u, delta, A, B, C, D, z, delta_bias) -> tuple:
    """The scan's inputs (u, delta, A, B, C, D, z, delta_bias) in the layouts its kernels read: activations with
    channel stride 1 (copied only where it is not), the rest contiguous."""
    u, delta, z = [_channels_contiguous(x) for x in (u, delta, z)]
    A, B, C, D, delta_bias = [x.contiguous() if x is not None else None for x in (A, B, C, D, delta_bias)]
    return u, delta, A, B, C, D, z, delta_bias


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True, reverse: bool = False, order: Optional[Tensor] = None,
) -> Tensor:
    """Fused selective scan; same contract as `star.ops.selective_scan` (layout (b, l, d), grouped parameters
    and scan orders allowed), output in u's dtype. Checks its inputs as `star.ops.selective_scan` does."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, order)
    return selective_scan_triton_unchecked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, order)


def selective_scan_triton_unchecked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                                    reverse=False, order=None) -> Tensor:
    """`selective_scan_triton` without the input checks: the op table's Triton entry, which
    `star.ops.selective_scan` calls once it has checked the inputs itself."""
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    u, delta, A, B, C, D, z, delta_bias = kernel_layout(*tensors)
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    order = order_table(order) if order is not None else None
    y, _ = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, order, delta_softplus, reverse, save_states)
    return y
