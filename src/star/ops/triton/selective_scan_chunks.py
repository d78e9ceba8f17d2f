"""Building blocks of the Triton selective scan (star.ops.triton.selective_scan and selective_scan_parts).

Every scan kernel walks a sequence in chunks of CHUNK steps over one block of channels, and composes the same
pieces, kept here once: the tile configuration per device, a program's channels and parameters, one chunk's
(CHUNK, BLOCK_D) loads in their stored dtype, its values in fp32, its states, and the host-side launch
arguments (strides, padded state size, tiles) that every kernel takes.
"""
import math
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from star.ops.orders import order_launch_args

# Tile sizes per device type and direction. SEGMENT (steps between saved states) is shared by both
# directions; each direction's CHUNK must divide it. The backward holds more tiles per element, so it runs
# with shorter chunks (fewer registers). The interpreter (CPU, TRITON_INTERPRET=1) runs element by element in
# Python, so it gets small tiles and short segments (several segments even in short test sequences); tl.dot
# needs at least 16 channels.
# CUDA tiles: the fastest of `benchmarks/scan.py --sweep`, last run on an H200 with the prefetching kernels
# (6af86b7, docs/benchmarks/scan_h200/): it kept fwd and SEGMENT and moved bwd from 64 channels on 2 warps to
# 32 on 1.
# Time parallelism (star.ops.triton.selective_scan_parts): a launch is cut into parts when its programs fill
# fewer than PARTS_BELOW_WAVES waves of RESIDENT_PER_SM programs per SM (234 registers per backward thread: 8
# one-warp programs fit an SM); the parts then aim at MIN_WAVES waves (0: never cut), each at least
# MIN_PART_SEGMENTS segments long. PARTS_BELOW_WAVES = 1 lies in the measured break-even (docs/benchmarks/k_sweep:
# launches of >= 1,224 programs ran slower in parts, <= 306 faster, 384 either way; star_tiny's K=4 is 384).
# The interpreter counts one "SM" and small numbers, so the tests' short sequences run in several parts.
CUDA_CONFIG = dict(SEGMENT=32, fwd=dict(BLOCK_D=32, CHUNK=4, num_warps=1),
                   bwd=dict(BLOCK_D=32, CHUNK=2, num_warps=1),
                   RESIDENT_PER_SM=8, PARTS_BELOW_WAVES=1, MIN_WAVES=4, MIN_PART_SEGMENTS=4)
INTERPRETER_CONFIG = dict(SEGMENT=8, fwd=dict(BLOCK_D=16, CHUNK=4, num_warps=1),
                          bwd=dict(BLOCK_D=16, CHUNK=2, num_warps=1),
                          RESIDENT_PER_SM=4, PARTS_BELOW_WAVES=4, MIN_WAVES=4, MIN_PART_SEGMENTS=1)
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
def _order_rows(order_ptr, pid_b, seq_per_order, L, ORDER: tl.constexpr):
    """This sequence's row of the scan-order table (groups, L), or the unused pointer without one."""
    if ORDER:
        order_ptr += (pid_b // seq_per_order) * L
    return order_ptr


@triton.jit
def _chunk_rows(chunk, L, CHUNK: tl.constexpr, REVERSE: tl.constexpr, rows_ptr, ORDER: tl.constexpr):
    """Time row each scan position of one chunk reads and writes, and which positions exist. With an order
    table (`_order_rows`) scan position p is row rows[p] (rows[L - 1 - p] in reverse): the tensors stay in
    their stored order and the kernel visits them in the scan's."""
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = (pos >= 0) & (pos < L)  # chunk -1 or n_chunks: loads issued ahead that are not used
    if REVERSE:
        t = L - 1 - pos
    else:
        t = pos
    if ORDER:
        t = tl.load(rows_ptr + t, mask=valid, other=0)
    return t, valid


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
def _shared_z(z_ptr, pid_b, z_batch, stride_zb):
    """z_ptr moved so that the loads at sequence pid_b's offset (pid_b * stride_zb) read z's sequence
    pid_b % z_batch: one run of gates that every group's run shares (z_batch = b / groups), or z itself."""
    return z_ptr + (pid_b % z_batch - pid_b) * stride_zb


@triton.jit
def _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK: tl.constexpr, REVERSE: tl.constexpr, rows_ptr,
                 ORDER: tl.constexpr):
    """One chunk's time rows t and their mask, its (CHUNK, BLOCK_D) mask and (b, l, d) offsets."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE, rows_ptr, ORDER)
    mask = mask_t[:, None] & mask_d[None, :]
    offs = (pid_b * L + t)[:, None] * D + offs_d[None, :]
    return t, mask_t, mask, offs


@triton.jit
def _chunk_loads(u_ptr, delta_ptr, z_ptr, chunk, pid_b, L, offs_d, mask_d, stride_ub, stride_ul, stride_deltab,
                 stride_deltal, stride_zb, stride_zl, CHUNK: tl.constexpr, REVERSE: tl.constexpr,
                 HAS_Z: tl.constexpr, rows_ptr, ORDER: tl.constexpr):
    """One chunk's per-channel tiles, as stored: u, delta and z (zeros without a gate)."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE, rows_ptr, ORDER)
    mask = mask_t[:, None] & mask_d[None, :]
    u = _load_rows(u_ptr, stride_ub, stride_ul, pid_b, t, offs_d, mask)
    delta = _load_rows(delta_ptr, stride_deltab, stride_deltal, pid_b, t, offs_d, mask)
    z = tl.zeros_like(u)
    if HAS_Z:
        z = _load_rows(z_ptr, stride_zb, stride_zl, pid_b, t, offs_d, mask)
    return u, delta, z


@triton.jit
def _chunk_bc(B_ptr, C_ptr, chunk, pid_b, L, offs_n, mask_n, N: tl.constexpr, CHUNK: tl.constexpr,
              REVERSE: tl.constexpr, rows_ptr, ORDER: tl.constexpr):
    """One chunk's (CHUNK, N_PAD) rows of B and C, as stored (every channel of the program reads them all)."""
    t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE, rows_ptr, ORDER)
    mask_bc = mask_t[:, None] & mask_n[None, :]
    offs_bc = (pid_b * L + t)[:, None] * N + offs_n[None, :]
    return tl.load(B_ptr + offs_bc, mask=mask_bc, other=0.0), tl.load(C_ptr + offs_bc, mask=mask_bc, other=0.0)


@triton.jit
def _chunk_dy(dy_ptr, chunk, pid_b, L, D, offs_d, mask_d, CHUNK: tl.constexpr, REVERSE: tl.constexpr, rows_ptr,
              ORDER: tl.constexpr):
    """The output gradient of one chunk, as stored (dy is contiguous)."""
    _, _, mask, offs = _chunk_index(chunk, pid_b, L, D, offs_d, mask_d, CHUNK, REVERSE, rows_ptr, ORDER)
    return tl.load(dy_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _chunk_values(u, delta, Bt, Ct, z, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The loaded tiles in fp32, delta after bias/softplus, and d softplus."""
    delta, dsoftplus = _delta_values(delta, mask, bias, HAS_BIAS, SOFTPLUS)
    return u.to(tl.float32), delta, dsoftplus, Bt.to(tl.float32), Ct.to(tl.float32), z.to(tl.float32)


def _config(u: Tensor) -> dict:
    return CUDA_CONFIG if u.is_cuda else INTERPRETER_CONFIG


def _n_segments(length: int, u: Tensor) -> int:
    return math.ceil(length / _config(u)["SEGMENT"])


def _launch_args(u: Tensor, A: Tensor, delta: Tensor, z: Optional[Tensor], direction: str,
                 order: Optional[Tensor] = None) -> dict:
    """Every scan kernel's shape, stride, order-table and tile arguments (`order`: int32 (groups, l) or None)."""
    n = A.shape[-1]
    config = _config(u)
    tiles = config[direction]
    if config["SEGMENT"] % tiles["CHUNK"]:
        raise ValueError(f"selective_scan_triton: SEGMENT={config['SEGMENT']} is not a multiple of the "
                         f"{direction} CHUNK={tiles['CHUNK']}")
    z_strides = z.stride()[:2] if z is not None else (0, 0)
    return dict(stride_ub=u.stride(0), stride_ul=u.stride(1), stride_deltab=delta.stride(0),
                stride_deltal=delta.stride(1), stride_zb=z_strides[0], stride_zl=z_strides[1],
                z_batch=z.shape[0] if z is not None else u.shape[0],
                **order_launch_args(u, order, u.shape[0]),
                N=n, N_PAD=triton.next_power_of_2(n), SEG_CHUNKS=config["SEGMENT"] // tiles["CHUNK"], **tiles)


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x
