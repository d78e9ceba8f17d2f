"""Selective scan (Mamba-1 S6) in Triton, forward and backward, (batch, length, channels) layout.

One program owns one (batch, block of channels) pair and walks the sequence in chunks of CHUNK steps.
A chunk is a (CHUNK, N, BLOCK_D) fp32 tile: channels are the thread axis, time and state sit inside each
thread, so each chunk's loads are one coalesced (CHUNK, BLOCK_D) tile, the recurrence
h_t = a_t * h_{t-1} + b_t is CHUNK unrolled FMAs per element, and sums over the state stay in-thread.

Memory traffic is kept near the floor by saving the state only every SEGMENT = CHUNK * SEG_CHUNKS steps
(fp32, (b, n_segments, n, d): 64 / SEGMENT bytes per token-channel). The backward walks the segments
from last to first, each in two passes:
  1. forward over the segment from its checkpoint: stores the state entering each chunk into a small
     per-program scratch (L2-resident), and uses the states it has in hand for dz, dC and dD;
  2. backward over the segment's chunks: reloads the chunk's entering state, recomputes the chunk
     (one exp per element), runs the adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t as a reverse scan, and
     reads du, d_delta, dB and dA off (h_t, g_t). a_{t+1} comes from the chunk's own decay tile,
     carried inside the reverse scan, and from the following chunk, so no second exp is needed.
Every loop over chunks issues the next chunk's loads before the current chunk's math (software pipelining
by hand; the kernels were latency bound, each chunk waiting for its own loads). The forward prefetches all
five tiles; the backward, near the register limit, only the per-channel ones (u, delta, z, dy).
Nothing is accumulated with atomics: dA, dD and d_delta_bias are per-batch partials and dB, dC are
per-channel-block partials, summed afterwards by torch in a fixed order, so gradients are deterministic.
u, delta and z may be strided views (only the channel stride must be 1), which saves the copies of the
mixer's (x, z) split. reverse=True only changes which time index a scan position reads.

Parallel over time. A long sequence in a small batch gives too few (batch, channel block) programs to fill
the GPU (4 sequences of 10,240 tokens at d=768: 96 programs for 132 SMs, each walking 10,240 steps). Then
each sequence is cut into `parts` (whole segments each) that run as programs of their own, in three steps
per direction, since the recurrence is linear in its carried value:
  1. a local pass per part from a zero start: the forward's state at the part's end (u, delta, B read; no
     outputs), the backward's adjoint carry at the part's start (delta, z, dy, C read), and the sum of delta
     over the part, which gives the part's total decay exp(A * sum delta) in one exp;
  2. a carry pass, one program per (sequence, channel block) over the parts in order (backward: in reverse):
     the true state entering part p is decay(p-1) * entering(p-1) + local end(p-1);
  3. the main kernels above, each part started from its true entering state (the backward from its true
     carry), so outputs, checkpoints and gradients are those of one long walk up to fp32 rounding.
The local passes cost about a third of a scan more; `_parts` uses them only where the programs are too few
(fewer than CUDA_CONFIG["MIN_WAVES"] waves of resident programs) and sequences span several segments.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.groups import sequences_per_group, sum_per_group
from star.ops.selective_scan import check_scan_inputs

# Tile sizes per device type and direction. SEGMENT (steps between saved states) is shared by both
# directions; each direction's CHUNK must divide it. The backward holds more tiles per element, so it runs
# with shorter chunks (fewer registers). The interpreter (CPU, TRITON_INTERPRET=1) runs element by element in
# Python, so it gets small tiles and short segments (several segments even in short test sequences); tl.dot
# needs at least 16 channels.
# CUDA tiles: the fastest of `benchmarks/scan.py --sweep`, last run on an H200 with the prefetching kernels
# (6af86b7, docs/benchmarks/scan_h200/): it kept fwd and SEGMENT and moved bwd from 64 channels on 2 warps to
# 32 on 1.
# Time parallelism (module docstring): a launch is cut into parts when its programs fill fewer than MIN_WAVES
# waves of RESIDENT_PER_SM programs per SM (234 registers per backward thread: 8 one-warp programs fit an
# SM); the parts then aim at MIN_WAVES waves, each at least MIN_PART_SEGMENTS segments long. The interpreter
# counts one "SM" and small numbers, so the tests' short sequences run in several parts.
CUDA_CONFIG = dict(SEGMENT=32, fwd=dict(BLOCK_D=32, CHUNK=4, num_warps=1),
                   bwd=dict(BLOCK_D=32, CHUNK=2, num_warps=1),
                   RESIDENT_PER_SM=8, MIN_WAVES=4, MIN_PART_SEGMENTS=4)
INTERPRETER_CONFIG = dict(SEGMENT=8, fwd=dict(BLOCK_D=16, CHUNK=4, num_warps=1),
                          bwd=dict(BLOCK_D=16, CHUNK=2, num_warps=1),
                          RESIDENT_PER_SM=4, MIN_WAVES=4, MIN_PART_SEGMENTS=1)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): exp2 is the hardware instruction


@triton.jit
def _row(x, index: tl.constexpr, CHUNK: tl.constexpr):
    """x[index] of a (CHUNK, ...) tile. Time sits inside each thread and the other rows are -0.0 (x + -0.0 == x
    exactly), so after constant folding this is plain register moves."""
    rows = tl.arange(0, CHUNK)[:, None, None]
    return tl.sum(tl.where(rows == index, x, -0.0), axis=0)


@triton.jit
def _set_row(x, index: tl.constexpr, value, CHUNK: tl.constexpr):
    rows = tl.arange(0, CHUNK)[:, None, None]
    return tl.where(rows == index, value[None, :, :], x)


@triton.jit
def _load_rows(ptr, stride_b, stride_l, pid_b, t, offs_d, mask):
    """A (CHUNK, BLOCK_D) tile in its stored dtype: converting it is left to where it is used, so a load issued
    a chunk ahead does not wait for its data."""
    return tl.load(ptr + pid_b * stride_b + t[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _delta_values(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Returns (delta after bias/softplus, zeroed where masked; d softplus / d input).

    softplus and its derivative share one exp: log(1 + e) and e / (1 + e), linear above 20 as in Mamba."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw += bias[None, :]
    if SOFTPLUS:
        e = tl.exp(tl.minimum(raw, 20.0))
        delta = tl.where(raw > 20.0, raw, tl.log(1.0 + e))
        dsoftplus = tl.where(raw > 20.0, 1.0, e / (1.0 + e))
    else:
        delta = raw
        dsoftplus = tl.full(raw.shape, 1.0, tl.float32)
    return tl.where(mask, delta, 0.0), dsoftplus


@triton.jit
def _chunk_rows(chunk, L, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Time index each scan position of one chunk reads, and which positions exist."""
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    if REVERSE:
        t = L - 1 - pos
    else:
        t = pos
    return t, (pos >= 0) & (pos < L)  # chunk -1 or n_chunks: loads issued ahead that are not used


@triton.jit
def _chunk_states(h, delta, u, Bt, A2, CHUNK: tl.constexpr):
    """Decays a, inputs b and states h_t (CHUNK, N, BLOCK_D) of one chunk entered with state h; also its last
    state. The steps are unrolled: one FMA per element and step, no scan machinery."""
    a = tl.exp2(delta[:, None, :] * A2[None, :, :])
    b = (delta * u)[:, None, :] * Bt[:, :, None]
    hs = tl.zeros_like(a)
    for i in tl.static_range(CHUNK):
        h = _row(a, i, CHUNK) * h + _row(b, i, CHUNK)
        hs = _set_row(hs, i, h, CHUNK)
    return a, b, hs, h


@triton.jit
def _store_channel_sum(ptr, x, t, part_base, mask_t, N: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Stores sum over channels of x (CHUNK, N_PAD, BLOCK_D) at rows t of a (.., l, N) partial.

    Channels are spread over the lanes, where tl.sum would cost 5 butterfly shuffles per value; a matrix
    product with a ones matrix does the sum on the tensor cores instead (column 0 of the product is kept)."""
    ones = tl.full((BLOCK_D, 16), 1.0, tl.float32)
    sums = tl.dot(tl.reshape(x, (CHUNK * N_PAD, BLOCK_D)), ones, input_precision=PRECISION)
    rows = tl.arange(0, CHUNK * N_PAD)
    cols = tl.arange(0, 16)
    t_rows = tl.reshape(tl.broadcast_to(t[:, None], (CHUNK, N_PAD)), (CHUNK * N_PAD,))
    mask_rows = tl.reshape(tl.broadcast_to(mask_t[:, None], (CHUNK, N_PAD)), (CHUNK * N_PAD,)) & (rows % N_PAD < N)
    offs = (part_base + t_rows) * N + rows % N_PAD
    tl.store(ptr + offs[:, None] + cols[None, :], sums, mask=mask_rows[:, None] & (cols == 0)[None, :])


@triton.jit
def _channel_block(pid_d, D, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's channels and state rows, and their masks: offs_d, offs_n, mask_d, mask_n, mask_nd."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < D
    mask_n = offs_n < N
    return offs_d, offs_n, mask_d, mask_n, mask_n[:, None] & mask_d[None, :]


@triton.jit
def _load_params(A_ptr, D_ptr, bias_ptr, group, offs_d, offs_n, mask_d, mask_nd, D, N: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A * log2(e) (N_PAD, BLOCK_D), dt bias and D (zeros when absent) of this program's channels, from the
    parameter set of `group` (grouped A is (groups, D, N), D and bias (groups, D); one group when ungrouped)."""
    A2 = tl.load(A_ptr + group * D * N + offs_d[None, :] * N + offs_n[:, None], mask=mask_nd,
                 other=0.0).to(tl.float32) * LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + group * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + group * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A2, bias, Dv


@triton.jit
def _gate(z, dy):
    """dy through the output gate y * silu(z): (dy * silu(z), dy * silu'(z), which times y is dz)."""
    sig_z = tl.sigmoid(z)
    return dy * z * sig_z, dy * sig_z * (1.0 + z * (1.0 - sig_z))


@triton.jit
def _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """One chunk's time rows t and their mask, its (CHUNK, BLOCK_D) mask and (b, l, d) offsets."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE)
    mask = mask_t[:, None] & mask_d[None, :]
    offs = (pid_b * L + t)[:, None] * D + offs_d[None, :]
    return t, mask_t, mask, offs


@triton.jit
def _chunk_loads(u_ptr, delta_ptr, z_ptr, chunk, pid_b, L, offs_d, mask_d, stride_ub, stride_ul, stride_deltab,
                 stride_deltal, stride_zb, stride_zl, CHUNK: tl.constexpr, REVERSE: tl.constexpr, HAS_Z: tl.constexpr):
    """One chunk's per-channel tiles, as stored: u, delta and z (zeros without a gate)."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE)
    mask = mask_t[:, None] & mask_d[None, :]
    u = _load_rows(u_ptr, stride_ub, stride_ul, pid_b, t, offs_d, mask)
    delta = _load_rows(delta_ptr, stride_deltab, stride_deltal, pid_b, t, offs_d, mask)
    z = tl.zeros_like(u)
    if HAS_Z:
        z = _load_rows(z_ptr, stride_zb, stride_zl, pid_b, t, offs_d, mask)
    return u, delta, z


@triton.jit
def _chunk_bc(B_ptr, C_ptr, chunk, pid_b, L, offs_n, mask_n, N: tl.constexpr, CHUNK: tl.constexpr,
              REVERSE: tl.constexpr):
    """One chunk's (CHUNK, N_PAD) rows of B and C, as stored (every channel of the program reads them all)."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE)
    mask_bc = mask_t[:, None] & mask_n[None, :]
    offs_bc = (pid_b * L + t)[:, None] * N + offs_n[None, :]
    return tl.load(B_ptr + offs_bc, mask=mask_bc, other=0.0), tl.load(C_ptr + offs_bc, mask=mask_bc, other=0.0)


@triton.jit
def _chunk_dy(dy_ptr, chunk, pid_b, L, D, offs_d, mask_d, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """The output gradient of one chunk, as stored (dy is contiguous)."""
    _, _, mask, offs = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
    return tl.load(dy_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The loaded tiles in fp32, delta after bias/softplus, and d softplus."""
    delta, dsoftplus = _delta_values(delta, mask, bias, HAS_BIAS, SOFTPLUS)
    return u.to(tl.float32), delta, dsoftplus, Bt.to(tl.float32), Ct.to(tl.float32), z.to(tl.float32)


@triton.jit
def _part_state(ptr, pid_b, pid_p, n_parts, offs_n, offs_d, D, N: tl.constexpr):
    """Offsets of one part's (N_PAD, BLOCK_D) state in a (b, parts, N, D) fp32 buffer."""
    return ptr + ((pid_b * n_parts + pid_p) * N + offs_n[:, None]) * D + offs_d[None, :]


@triton.jit
def _part_chunks(pid_p, part_segments, L, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr):
    """First chunk and end chunk (exclusive) of part pid_p, which spans `part_segments` whole segments."""
    first = pid_p * part_segments * SEG_CHUNKS
    return first, tl.minimum(first + part_segments * SEG_CHUNKS, tl.cdiv(L, CHUNK))


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, ckpt_ptr, init_ptr,
    L, D, n_segments, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_INIT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(2)
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
                                              CHUNK, REVERSE, HAS_Z)
    B_next, C_next = _chunk_bc(B_ptr, C_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
    for chunk in range(first, end):
        if SAVE_STATES:
            if chunk % SEG_CHUNKS == 0:
                tl.store(ckpt_base + (chunk // SEG_CHUNKS) * N * D, h, mask=mask_nd)
        u, delta, Bt, Ct, z = u_next, delta_next, B_next, C_next, z_next
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, chunk + 1, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z)
        B_next, C_next = _chunk_bc(B_ptr, C_ptr, chunk + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
        t, mask_t, mask, offs = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
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
    stride_zb, stride_zl,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr, HAS_INIT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
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

        # Pass 1, forward: the state entering each chunk goes to scratch; dz, dC and dD use the states.
        # Each pass issues the next chunk's loads before this chunk's math, as the forward kernel does.
        h = tl.load(ckpt_base + seg * N * D, mask=mask_nd, other=0.0)
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z)
        dy_next = _chunk_dy(dy_ptr, first, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
        for k in range(seg_chunks):
            tl.store(scratch_base + k * N_PAD * BLOCK_D, h)
            u, delta, z, dy = u_next, delta_next, z_next, dy_next
            u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first + k + 1, pid_b, L, offs_d,
                                                      mask_d, stride_ub, stride_ul, stride_deltab, stride_deltal,
                                                      stride_zb, stride_zl, CHUNK, REVERSE, HAS_Z)
            dy_next = _chunk_dy(dy_ptr, first + k + 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
            Bt, Ct = _chunk_bc(B_ptr, C_ptr, first + k, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
            t, mask_t, mask, offs = _chunk_index(first + k, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
            u, delta, _, Bt, Ct, z = _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
            dy = dy.to(tl.float32)
            _, _, hs, h = _chunk_states(h, delta, u, Bt, A2, CHUNK)
            if HAS_Z:
                y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
                dy, dy_dsilu = _gate(z, dy)
                tl.store(dz_ptr + offs, (dy_dsilu * y).to(dz_ptr.dtype.element_ty), mask=mask)
            _store_channel_sum(dC_part_ptr, hs * dy[:, None, :], t, part_bc_base, mask_t, N, N_PAD, CHUNK, BLOCK_D,
                               PRECISION)
            dD_acc += tl.sum(dy * u, axis=0)

        # Pass 2, backward over the same chunks: recompute each from its entering state, then the adjoint.
        last = first + seg_chunks - 1
        u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, last, pid_b, L, offs_d, mask_d,
                                                  stride_ub, stride_ul, stride_deltab, stride_deltal, stride_zb,
                                                  stride_zl, CHUNK, REVERSE, HAS_Z)
        dy_next = _chunk_dy(dy_ptr, last, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
        for j in range(seg_chunks):
            k = seg_chunks - 1 - j
            h0 = tl.load(scratch_base + k * N_PAD * BLOCK_D)
            u, delta, z, dy = u_next, delta_next, z_next, dy_next
            # chunk first - 1 is the next segment's (or, before the sequence start, masked): loaded, not used
            u_next, delta_next, z_next = _chunk_loads(u_ptr, delta_ptr, z_ptr, first + k - 1, pid_b, L, offs_d,
                                                      mask_d, stride_ub, stride_ul, stride_deltab, stride_deltal,
                                                      stride_zb, stride_zl, CHUNK, REVERSE, HAS_Z)
            Bt, Ct = _chunk_bc(B_ptr, C_ptr, first + k, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
            dy_next = _chunk_dy(dy_ptr, first + k - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
            t, mask_t, mask, offs = _chunk_index(first + k, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
            u, delta, dsoftplus, Bt, Ct, z = _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
            dy = dy.to(tl.float32)
            if HAS_Z:
                dy, _ = _gate(z, dy)
            a, b, hs, _ = _chunk_states(h0, delta, u, Bt, A2, CHUNK)

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


@triton.jit
def _part_program(A_ptr, bias_ptr, first_part, L, D, part_segments, seq_per_group, N: tl.constexpr,
                  N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """What a local-pass program works on: its sequence, part (grid axis 2 counts from `first_part`), channels,
    state rows, masks, A * log2(e), dt bias, and its chunk range."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(2) + first_part
    offs_d, offs_n, mask_d, mask_n, mask_nd = _channel_block(tl.program_id(1), D, N, N_PAD, BLOCK_D)
    A2, bias, _ = _load_params(A_ptr, A_ptr, bias_ptr, pid_b // seq_per_group, offs_d, offs_n, mask_d, mask_nd, D,
                               N, BLOCK_D, False, HAS_BIAS)
    first, end = _part_chunks(pid_p, part_segments, L, CHUNK, SEG_CHUNKS)
    return pid_b, pid_p, offs_d, offs_n, mask_d, mask_n, mask_nd, A2, bias, first, end


@triton.jit
def _store_part(state_ptr, delta_sum_ptr, state, delta_sum, pid_b, pid_p, n_parts, offs_n, offs_d, mask_d, mask_nd, D,
                N: tl.constexpr):
    """A local pass's result: the part's state (or carry) and its sum of delta."""
    tl.store(_part_state(state_ptr, pid_b, pid_p, n_parts, offs_n, offs_d, D, N), state, mask=mask_nd)
    tl.store(delta_sum_ptr + (pid_b * n_parts + pid_p) * D + offs_d, delta_sum, mask=mask_d)


@triton.jit
def _part_end_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, end_ptr, delta_sum_ptr,
    L, D, n_parts, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Time-parallel forward, step 1: the state at the end of each part but the last from a zero start, and the
    part's sum of delta. Launched over parts 0 .. n_parts - 2 (the last part's end feeds nothing)."""
    pid_b, pid_p, offs_d, offs_n, mask_d, mask_n, mask_nd, A2, bias, first, end = _part_program(
        A_ptr, bias_ptr, 0, L, D, part_segments, seq_per_group, N, N_PAD, BLOCK_D, CHUNK, SEG_CHUNKS, HAS_BIAS)
    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    u_next, delta_next, _ = _chunk_loads(u_ptr, delta_ptr, u_ptr, first, pid_b, L, offs_d, mask_d, stride_ub,
                                         stride_ul, stride_deltab, stride_deltal, 0, 0, CHUNK, REVERSE, False)
    B_next, _ = _chunk_bc(B_ptr, B_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
    for chunk in range(first, end):
        u, delta, Bt = u_next, delta_next, B_next
        u_next, delta_next, _ = _chunk_loads(u_ptr, delta_ptr, u_ptr, chunk + 1, pid_b, L, offs_d, mask_d, stride_ub,
                                             stride_ul, stride_deltab, stride_deltal, 0, 0, CHUNK, REVERSE, False)
        B_next, _ = _chunk_bc(B_ptr, B_ptr, chunk + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
        _, _, mask, _ = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
        u, delta, _, Bt, _, _ = _chunk_values(u, delta, Bt, Bt, u, mask, bias, HAS_BIAS, SOFTPLUS)
        _, _, _, h = _chunk_states(h, delta, u, Bt, A2, CHUNK)
        delta_sum += tl.sum(delta, axis=0)
    _store_part(end_ptr, delta_sum_ptr, h, delta_sum, pid_b, pid_p, n_parts, offs_n, offs_d, mask_d, mask_nd, D, N)


@triton.jit
def _part_adjoint_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, carry_ptr, delta_sum_ptr,
    L, D, n_parts, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Time-parallel backward, step 1: the adjoint carry a_t g_t at the start of each part but the first, from a
    zero carry at the part's end (g_t = C_t dy_t + a_{t+1} g_{t+1} needs no states), and the part's sum of delta.
    Launched over parts 1 .. n_parts - 1 (the first part's carry feeds nothing)."""
    pid_b, pid_p, offs_d, offs_n, mask_d, mask_n, mask_nd, A2, bias, first, end = _part_program(
        A_ptr, bias_ptr, 1, L, D, part_segments, seq_per_group, N, N_PAD, BLOCK_D, CHUNK, SEG_CHUNKS, HAS_BIAS)
    carry = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    _, delta_next, z_next = _chunk_loads(delta_ptr, delta_ptr, z_ptr, end - 1, pid_b, L, offs_d, mask_d,
                                         stride_deltab, stride_deltal, stride_deltab, stride_deltal, stride_zb,
                                         stride_zl, CHUNK, REVERSE, HAS_Z)
    dy_next = _chunk_dy(dy_ptr, end - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
    for j in range(end - first):
        chunk = end - 1 - j
        delta, z, dy = delta_next, z_next, dy_next
        _, delta_next, z_next = _chunk_loads(delta_ptr, delta_ptr, z_ptr, chunk - 1, pid_b, L, offs_d, mask_d,
                                             stride_deltab, stride_deltal, stride_deltab, stride_deltal, stride_zb,
                                             stride_zl, CHUNK, REVERSE, HAS_Z)
        dy_next = _chunk_dy(dy_ptr, chunk - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
        Ct, _ = _chunk_bc(C_ptr, C_ptr, chunk, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE)
        _, _, mask, _ = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE)
        _, delta, _, Ct, _, z = _chunk_values(delta, delta, Ct, Ct, z, mask, bias, HAS_BIAS, SOFTPLUS)
        dy = dy.to(tl.float32)
        if HAS_Z:
            dy, _ = _gate(z, dy)
        a = tl.exp2(delta[:, None, :] * A2[None, :, :])
        c = dy[:, None, :] * Ct[:, :, None]
        for i in tl.static_range(CHUNK - 1, -1, -1):
            carry = _row(a, i, CHUNK) * (_row(c, i, CHUNK) + carry)
        delta_sum += tl.sum(delta, axis=0)
    _store_part(carry_ptr, delta_sum_ptr, carry, delta_sum, pid_b, pid_p, n_parts, offs_n, offs_d, mask_d, mask_nd, D,
                N)


@triton.jit
def _part_carry_kernel(A_ptr, local_ptr, delta_sum_ptr, entering_ptr, D, n_parts, seq_per_group,
                       N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """Time-parallel step 2: the true value entering every part, walking the parts in order (the forward's states)
    or in reverse order (the backward's carries): entering(next) = exp(A * sum delta) * entering + local."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, mask_nd = _channel_block(tl.program_id(1), D, N, N_PAD, BLOCK_D)
    A2, _, _ = _load_params(A_ptr, A_ptr, A_ptr, pid_b // seq_per_group, offs_d, offs_n, mask_d, mask_nd, D, N,
                            BLOCK_D, False, False)
    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    for i in range(n_parts - 1):
        if BACKWARD:
            p = n_parts - 1 - i
        else:
            p = i
        tl.store(_part_state(entering_ptr, pid_b, p, n_parts, offs_n, offs_d, D, N), h, mask=mask_nd)
        delta_sum = tl.load(delta_sum_ptr + (pid_b * n_parts + p) * D + offs_d, mask=mask_d, other=0.0)
        local = tl.load(_part_state(local_ptr, pid_b, p, n_parts, offs_n, offs_d, D, N), mask=mask_nd, other=0.0)
        h = tl.exp2(A2 * delta_sum[None, :]) * h + local
    if BACKWARD:
        last = 0
    else:
        last = n_parts - 1
    tl.store(_part_state(entering_ptr, pid_b, last, n_parts, offs_n, offs_d, D, N), h, mask=mask_nd)


def _config(u: Tensor) -> dict:
    return CUDA_CONFIG if u.is_cuda else INTERPRETER_CONFIG


def _n_segments(length: int, u: Tensor) -> int:
    return math.ceil(length / _config(u)["SEGMENT"])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _parts(u: Tensor, d: int, direction: str) -> tuple[int, int]:
    """(parts, segments per part) of a launch over u's (b, l) sequences: one part while the (sequence, channel
    block) programs fill MIN_WAVES waves of the GPU, else enough parts for that many waves, none shorter than
    MIN_PART_SEGMENTS segments (module docstring)."""
    config = _config(u)
    b, l = u.shape[:2]
    n_segments = _n_segments(l, u)
    programs = b * triton.cdiv(d, config[direction]["BLOCK_D"])
    sms = _sm_count(u.device.index if u.device.index is not None else torch.cuda.current_device()) \
        if u.is_cuda else 1
    target = config["MIN_WAVES"] * config["RESIDENT_PER_SM"] * sms
    parts = min(triton.cdiv(target, programs), n_segments // config["MIN_PART_SEGMENTS"]) if programs < target else 1
    if parts <= 1:
        return 1, n_segments
    part_segments = triton.cdiv(n_segments, parts)
    return triton.cdiv(n_segments, part_segments), part_segments


def _entering(u, delta, A, B, C, z, delta_bias, dy, flags, parts, part_segments, direction):
    """Time-parallel steps 1 and 2 (module docstring): the true state (forward) or adjoint carry (backward)
    entering each part, (b, parts, N, D) fp32."""
    b, l, d = u.shape
    n = A.shape[-1]
    args = _launch_args(u, A, delta, z, direction)
    local = u.new_empty((b, parts, n, d), dtype=torch.float32)
    delta_sum = u.new_empty((b, parts, d), dtype=torch.float32)
    entering = torch.empty_like(local)
    grid = (b, triton.cdiv(d, args["BLOCK_D"]))
    common = (l, d, parts, part_segments, sequences_per_group(u, A))
    if direction == "fwd":
        _part_end_state_kernel[(*grid, parts - 1)](u, delta, A, B, _empty_if_none(delta_bias, u), local, delta_sum,
                                                   *common, **args, **flags)
    else:
        _part_adjoint_kernel[(*grid, parts - 1)](delta, A, C, _empty_if_none(z, u), _empty_if_none(delta_bias, u), dy,
                                                 local, delta_sum, *common, **args, **flags)
    _part_carry_kernel[grid](A, local, delta_sum, entering, d, parts, sequences_per_group(u, A), N=n,
                             N_PAD=args["N_PAD"], BLOCK_D=args["BLOCK_D"], BACKWARD=direction == "bwd", num_warps=1)
    return entering


def _launch_args(u: Tensor, A: Tensor, delta: Tensor, z: Optional[Tensor], direction: str) -> dict:
    n = A.shape[-1]
    config = _config(u)
    tiles = config[direction]
    if config["SEGMENT"] % tiles["CHUNK"]:
        raise ValueError(f"selective_scan_triton: SEGMENT={config['SEGMENT']} is not a multiple of the "
                         f"{direction} CHUNK={tiles['CHUNK']}")
    z_strides = z.stride()[:2] if z is not None else (0, 0)
    return dict(stride_ub=u.stride(0), stride_ul=u.stride(1), stride_deltab=delta.stride(0),
                stride_deltal=delta.stride(1), stride_zb=z_strides[0], stride_zl=z_strides[1],
                N=n, N_PAD=triton.next_power_of_2(n), SEG_CHUNKS=config["SEGMENT"] // tiles["CHUNK"], **tiles)


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x


def _flags(D, z, delta_bias, delta_softplus, reverse) -> dict:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, REVERSE=reverse)


@torch.library.custom_op("star::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
    delta_softplus: bool, reverse: bool, save_states: bool,
) -> tuple[Tensor, Tensor]:
    b, l, d = u.shape
    n = A.shape[-1]
    n_segments = _n_segments(l, u)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse)
    parts, part_segments = _parts(u, d, "fwd")
    entering = _entering(u, delta, A, B, C, z, delta_bias, None, flags, parts, part_segments, "fwd") \
        if parts > 1 else u.new_empty(0)
    y = u.new_empty((b, l, d))
    ckpt = u.new_empty((b, n_segments, n, d) if save_states else (0,), dtype=torch.float32)
    _scan_fwd_kernel[(b, triton.cdiv(d, _config(u)["fwd"]["BLOCK_D"]), parts)](
        u, delta, A, B, C, _empty_if_none(D, u), _empty_if_none(z, u), _empty_if_none(delta_bias, u), y, ckpt,
        entering, l, d, n_segments, part_segments, sequences_per_group(u, A), **_launch_args(u, A, delta, z, "fwd"),
        **flags, SAVE_STATES=save_states, HAS_INIT=parts > 1,
    )
    return y, ckpt


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_states):
    b, l, d = u.shape
    ckpt_shape = (b, _n_segments(l, u), A.shape[-1], d) if save_states else (0,)
    return u.new_empty((b, l, d)), u.new_empty(ckpt_shape, dtype=torch.float32)


@torch.library.custom_op("star::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], ckpt: Tensor,
    delta_softplus: bool, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns du, ddelta, dA, dB, dC, dD, dz, d_delta_bias; the last three are empty when unused."""
    b, l, d = u.shape
    n = A.shape[-1]
    tiles = _config(u)["bwd"]
    n_dblocks = triton.cdiv(d, tiles["BLOCK_D"])
    f32 = dict(dtype=torch.float32)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse)
    parts, part_segments = _parts(u, d, "bwd")
    entering = _entering(u, delta, A, B, C, z, delta_bias, dy, flags, parts, part_segments, "bwd") \
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
        l, d, _n_segments(l, u), part_segments, sequences_per_group(u, A), **_launch_args(u, A, delta, z, "bwd"),
        **flags, PRECISION="tf32x3" if u.dtype == torch.float32 else "tf32", HAS_INIT=parts > 1,
    )
    groups = b // sequences_per_group(u, A)
    dA_part, dD_part, dbias_part = (x.sum(1) if x.numel() else x for x in (dA_part, dD_part, dbias_part))
    dA = sum_per_group(dA_part, groups).transpose(-1, -2).reshape(A.shape).contiguous().to(A.dtype)  # A's layout
    dB = dB_part.sum(1).to(B.dtype)
    dC = dC_part.sum(1).to(C.dtype)
    dD = sum_per_group(dD_part, groups).reshape(D.shape).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = sum_per_group(dbias_part, groups).reshape(delta_bias.shape).to(delta_bias.dtype) \
        if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


@_selective_scan_bwd.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, reverse):
    empty = u.new_empty(0)
    b, l, d = u.shape
    return (
        u.new_empty((b, l, d)), delta.new_empty((b, l, d)), torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B), torch.empty_like(C),
        empty if D is None else torch.empty_like(D), empty if z is None else z.new_empty((b, l, d)),
        empty if delta_bias is None else torch.empty_like(delta_bias),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_states = inputs
    if not save_states:
        raise RuntimeError("selective_scan_triton: backward needs the forward to run with save_states=True")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse


def _backward(ctx, dy, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
        dy.contiguous(), u, delta, A, B, C, D, z, delta_bias, ckpt, ctx.delta_softplus, ctx.reverse
    )
    return (
        du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
        dbias if delta_bias is not None else None, None, None, None,
    )


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _channels_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    """(b, l, d) activations are read through their batch/time strides; only the channel stride must be 1."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True, reverse: bool = False,
) -> Tensor:
    """Fused selective scan; same contract as `star.ops.selective_scan` (layout (b, l, d), grouped parameters
    allowed), output in u's dtype."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    u, delta, z = (_channels_contiguous(x) for x in (u, delta, z))
    A, B, C, D, delta_bias = (x.contiguous() if x is not None else None for x in (A, B, C, D, delta_bias))
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    y, _ = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_states)
    return y
