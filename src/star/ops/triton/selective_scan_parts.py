"""Selective scan parallel over time: long sequences cut into parts that run as programs of their own.

A long sequence in a small batch gives too few (batch, channel block) programs to fill the GPU (4 sequences
of 10,240 tokens at d=768: 96 programs for 132 SMs, each walking 10,240 steps). Then each sequence is cut
into `parts` (whole segments each) that run as programs of their own, in three steps per direction, since
the recurrence is linear in its carried value:
  1. a local pass per part from a zero start: the forward's state at the part's end (u, delta, B read; no
     outputs), the backward's adjoint carry at the part's start (delta, z, dy, C read), and the sum of delta
     over the part, which gives the part's total decay exp(A * sum delta) in one exp;
  2. a carry pass, one program per (sequence, channel block) over the parts in order (backward: in reverse):
     the true state entering part p is decay(p-1) * entering(p-1) + local end(p-1);
  3. the main kernels (star.ops.triton.selective_scan), each part started from its true entering state (the
     backward from its true carry), so outputs, checkpoints and gradients are those of one long walk up to
     fp32 rounding.
The local passes cost about a third of a scan more; `_parts` uses them only where the programs are too few
(fewer than CUDA_CONFIG["PARTS_BELOW_WAVES"] waves of resident programs) and sequences span several segments.
"""
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from star.ops.groups import sequences_per_group
from star.ops.triton.selective_scan_chunks import (_channel_block, _chunk_bc, _chunk_dy, _chunk_index, _chunk_loads,
                                                   _chunk_states, _chunk_values, _config, _empty_if_none, _gate,
                                                   _launch_args, _load_params, _n_segments, _order_rows, _row,
                                                   _shared_z)


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
    stride_zb, stride_zl, z_batch, order_ptr, seq_per_order,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ORDER: tl.constexpr,
):
    """Time-parallel forward, step 1: the state at the end of each part but the last from a zero start, and the
    part's sum of delta. Launched over parts 0 .. n_parts - 2 (the last part's end feeds nothing)."""
    pid_b, pid_p, offs_d, offs_n, mask_d, mask_n, mask_nd, A2, bias, first, end = _part_program(
        A_ptr, bias_ptr, 0, L, D, part_segments, seq_per_group, N, N_PAD, BLOCK_D, CHUNK, SEG_CHUNKS, HAS_BIAS)
    rows = _order_rows(order_ptr, pid_b, seq_per_order, L, ORDER)
    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # What a load before a loop leaves unused is not named `_`: the loop reassigns `_` with other types, and a
    # name both bound before a loop and reassigned in it is loop-carried, so its type must stay (Triton fails
    # to compile it; the interpreter does not check).
    u_next, delta_next, _z = _chunk_loads(u_ptr, delta_ptr, u_ptr, first, pid_b, L, offs_d, mask_d, stride_ub,
                                          stride_ul, stride_deltab, stride_deltal, 0, 0, CHUNK, REVERSE, False, rows,
                                          ORDER)
    B_next, _B = _chunk_bc(B_ptr, B_ptr, first, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
    for chunk in range(first, end):
        u, delta, Bt = u_next, delta_next, B_next
        u_next, delta_next, _ = _chunk_loads(u_ptr, delta_ptr, u_ptr, chunk + 1, pid_b, L, offs_d, mask_d, stride_ub,
                                             stride_ul, stride_deltab, stride_deltal, 0, 0, CHUNK, REVERSE, False, rows,
                                             ORDER)
        B_next, _ = _chunk_bc(B_ptr, B_ptr, chunk + 1, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        _, _, mask, _ = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
        u, delta, _, Bt, _, _ = _chunk_values(u, delta, Bt, Bt, u, mask, bias, HAS_BIAS, SOFTPLUS)
        _, _, _, h = _chunk_states(h, delta, u, Bt, A2, CHUNK)
        delta_sum += tl.sum(delta, axis=0)
    _store_part(end_ptr, delta_sum_ptr, h, delta_sum, pid_b, pid_p, n_parts, offs_n, offs_d, mask_d, mask_nd, D, N)


@triton.jit
def _part_adjoint_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, carry_ptr, delta_sum_ptr,
    L, D, n_parts, part_segments, seq_per_group, stride_ub, stride_ul, stride_deltab, stride_deltal,
    stride_zb, stride_zl, z_batch, order_ptr, seq_per_order,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ORDER: tl.constexpr,
):
    """Time-parallel backward, step 1: the adjoint carry a_t g_t at the start of each part but the first, from a
    zero carry at the part's end (g_t = C_t dy_t + a_{t+1} g_{t+1} needs no states), and the part's sum of delta.
    Launched over parts 1 .. n_parts - 1 (the first part's carry feeds nothing)."""
    pid_b, pid_p, offs_d, offs_n, mask_d, mask_n, mask_nd, A2, bias, first, end = _part_program(
        A_ptr, bias_ptr, 1, L, D, part_segments, seq_per_group, N, N_PAD, BLOCK_D, CHUNK, SEG_CHUNKS, HAS_BIAS)
    rows = _order_rows(order_ptr, pid_b, seq_per_order, L, ORDER)
    z_ptr = _shared_z(z_ptr, pid_b, z_batch, stride_zb)
    carry = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    _u, delta_next, z_next = _chunk_loads(delta_ptr, delta_ptr, z_ptr, end - 1, pid_b, L, offs_d, mask_d,
                                          stride_deltab, stride_deltal, stride_deltab, stride_deltal, stride_zb,
                                          stride_zl, CHUNK, REVERSE, HAS_Z, rows,
                                          ORDER)  # not `_`: see _part_end_state_kernel
    dy_next = _chunk_dy(dy_ptr, end - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
    for j in range(end - first):
        chunk = end - 1 - j
        delta, z, dy = delta_next, z_next, dy_next
        _, delta_next, z_next = _chunk_loads(delta_ptr, delta_ptr, z_ptr, chunk - 1, pid_b, L, offs_d, mask_d,
                                             stride_deltab, stride_deltal, stride_deltab, stride_deltal, stride_zb,
                                             stride_zl, CHUNK, REVERSE, HAS_Z, rows, ORDER)
        dy_next = _chunk_dy(dy_ptr, chunk - 1, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
        Ct, _ = _chunk_bc(C_ptr, C_ptr, chunk, pid_b, L, offs_n, mask_n, N, CHUNK, REVERSE, rows, ORDER)
        _, _, mask, _ = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows, ORDER)
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


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _parts(u: Tensor, d: int, direction: str) -> tuple[int, int]:
    """(parts, segments per part) of a launch over u's (b, l) sequences: one part while the (sequence, channel
    block) programs fill PARTS_BELOW_WAVES waves of the GPU, else enough parts for MIN_WAVES waves, none shorter
    than MIN_PART_SEGMENTS segments (module docstring)."""
    config = _config(u)
    b, l = u.shape[:2]
    n_segments = _n_segments(l, u)
    programs = b * triton.cdiv(d, config[direction]["BLOCK_D"])
    sms = _sm_count(u.device.index if u.device.index is not None else torch.cuda.current_device()) \
        if u.is_cuda else 1
    wave = config["RESIDENT_PER_SM"] * sms
    target = config["MIN_WAVES"] * wave
    parts = 1 if programs >= config["PARTS_BELOW_WAVES"] * wave else \
        min(triton.cdiv(target, programs), n_segments // config["MIN_PART_SEGMENTS"])
    if parts <= 1:
        return 1, n_segments
    part_segments = triton.cdiv(n_segments, parts)
    return triton.cdiv(n_segments, part_segments), part_segments


def _entering(u, delta, A, B, C, z, delta_bias, order, dy, flags, parts, part_segments, direction):
    """Time-parallel steps 1 and 2 (module docstring): the true state (forward) or adjoint carry (backward)
    entering each part, (b, parts, N, D) fp32."""
    b, l, d = u.shape
    n = A.shape[-1]
    args = _launch_args(u, A, delta, z, direction, order)
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
