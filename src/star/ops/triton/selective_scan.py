"""Selective scan (Mamba-1 S6) in Triton, forward and backward, (batch, length, channels) layout.

One program owns one (batch, block of channels) pair and walks the sequence in chunks of CHUNK steps.
Inside a chunk the recurrence h_t = a_t * h_{t-1} + b_t is solved for all CHUNK steps at once with
`tl.associative_scan` on a (CHUNK, N, BLOCK_D) fp32 tile, so each chunk's loads are one coalesced
(CHUNK, BLOCK_D) tile instead of CHUNK tiny dependent loads. Channels are the last (thread) axis, so the
time scan and the sum over the state run inside each thread, not across lanes.

The forward stores only the state entering each chunk (b, n_chunks, n, d) fp32. The backward walks the
chunks in the opposite order, recomputes the chunk's states from that checkpoint, runs the adjoint
recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t as a reverse scan, and reads every gradient off (h_t, g_t).
Nothing is accumulated with atomics: dA, dD and d_delta_bias are per-batch partials and dB, dC are
per-channel-block partials, summed afterwards by torch in a fixed order, so gradients are deterministic.
reverse=True only changes which time index a scan position reads, so no flipped copies are made.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tile sizes per device type. The interpreter (CPU, TRITON_INTERPRET=1) runs scans element by element in
# Python, so it gets small tiles; CHUNK is also the checkpoint interval and shapes the saved states.
CUDA_CONFIG = dict(BLOCK_D=32, CHUNK=4, num_warps=1)  # fastest in the H100 sweep (docs/benchmarks)
INTERPRETER_CONFIG = dict(BLOCK_D=8, CHUNK=8, num_warps=1)


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    # Composition of h -> a1 h + b1 followed by h -> a2 h + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_delta(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Returns (delta after bias/softplus, zeroed where masked; d softplus / d input)."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[None, :]
    if SOFTPLUS:
        delta = _softplus(raw)
        dsoftplus = tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    else:
        delta = raw
        dsoftplus = tl.full(raw.shape, 1.0, tl.float32)
    return tl.where(mask, delta, 0.0), dsoftplus


@triton.jit
def _chunk_rows(chunk, L, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Scan positions of one chunk, the time index each reads, and which exist."""
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    if REVERSE:
        t = L - 1 - pos
    else:
        t = pos
    return t, pos < L


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, ckpt_ptr,
    L, D, n_chunks,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, SAVE_STATES: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    rows = tl.arange(0, CHUNK)

    A2 = tl.load(A_ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    ckpt_base = ckpt_ptr + pid_b * n_chunks * N * D + offs_n[:, None] * D + offs_d[None, :]

    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    for chunk in range(n_chunks):
        if SAVE_STATES:
            tl.store(ckpt_base + chunk * N * D, h, mask=mask_nd)
        t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE)
        mask = mask_t[:, None] & mask_d[None, :]
        offs = (pid_b * L + t)[:, None] * D + offs_d[None, :]
        offs_bc = (pid_b * L + t)[:, None] * N + offs_n[None, :]
        mask_bc = mask_t[:, None] & mask_n[None, :]

        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta, _ = _load_delta(delta_ptr, bias, offs, mask, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + offs_bc, mask=mask_bc, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + offs_bc, mask=mask_bc, other=0.0).to(tl.float32)

        a = tl.exp2(delta[:, None, :] * A2[None, :, :])
        b = (delta * u)[:, None, :] * Bt[:, :, None]
        a_cum, b_cum = tl.associative_scan((a, b), 0, _linear_recurrence)
        hs = a_cum * h[None, :, :] + b_cum
        y = tl.sum(hs * Ct[:, :, None], axis=1)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(rows[:, None, None] == CHUNK - 1, hs, 0.0), axis=0)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, ckpt_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
    L, D, n_chunks,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    rows = tl.arange(0, CHUNK)

    A = tl.load(A_ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    ckpt_base = ckpt_ptr + pid_b * n_chunks * N * D + offs_n[:, None] * D + offs_d[None, :]
    part_bc_base = (pid_b * n_dblocks + pid_d) * L

    g_next = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)  # adjoint of the state at the next chunk's first step
    dA_acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        h0 = tl.load(ckpt_base + chunk * N * D, mask=mask_nd, other=0.0)
        t, mask_t = _chunk_rows(chunk, L, CHUNK, REVERSE)
        t_next = t - 1 if REVERSE else t + 1  # the next scan position
        mask = mask_t[:, None] & mask_d[None, :]
        mask_next = ((chunk * CHUNK + rows + 1) < L)[:, None] & mask_d[None, :]
        offs = (pid_b * L + t)[:, None] * D + offs_d[None, :]
        offs_next = (pid_b * L + t_next)[:, None] * D + offs_d[None, :]
        offs_bc = (pid_b * L + t)[:, None] * N + offs_n[None, :]
        mask_bc = mask_t[:, None] & mask_n[None, :]

        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta, dsoftplus = _load_delta(delta_ptr, bias, offs, mask, HAS_BIAS, SOFTPLUS)
        delta_next, _ = _load_delta(delta_ptr, bias, offs_next, mask_next, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + offs_bc, mask=mask_bc, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + offs_bc, mask=mask_bc, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        # Recompute this chunk's states from its checkpoint.
        a = tl.exp2(delta[:, None, :] * A2[None, :, :])
        b = (delta * u)[:, None, :] * Bt[:, :, None]
        a_cum, b_cum = tl.associative_scan((a, b), 0, _linear_recurrence)
        hs = a_cum * h0[None, :, :] + b_cum

        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig_z = tl.sigmoid(z)
            y = tl.sum(hs * Ct[:, :, None], axis=1)
            if HAS_D:
                y += Dv[None, :] * u
            dz = dy * y * sig_z * (1.0 + z * (1.0 - sig_z))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * z * sig_z

        # Adjoint: g_t = a_{t+1} g_{t+1} + C_t dy_t, carried in from the next chunk through g_next.
        a_next = tl.exp2(delta_next[:, None, :] * A2[None, :, :])
        c = dy[:, None, :] * Ct[:, :, None]
        a_rcum, g_in = tl.associative_scan((a_next, c), 0, _linear_recurrence, reverse=True)
        g = g_in + a_rcum * g_next[None, :, :]
        g_next = tl.sum(tl.where(rows[:, None, None] == 0, g, 0.0), axis=0)

        decayed = hs - b  # a_t h_{t-1}, without needing the shifted state
        gB = g * Bt[:, :, None]
        ddelta = tl.sum(g * decayed * A[None, :, :] + gB * u[:, None, :], axis=1)
        du = tl.sum(gB, axis=1) * delta
        if HAS_D:
            du += Dv[None, :] * dy
            dD_acc += tl.sum(dy * u, axis=0)
        dA_acc += tl.sum(g * decayed * delta[:, None, :], axis=0)
        ddelta = tl.where(mask, ddelta * dsoftplus, 0.0)
        dbias_acc += tl.sum(ddelta, axis=0)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)

        part_offs = (part_bc_base + t)[:, None] * N + offs_n[None, :]
        tl.store(dB_part_ptr + part_offs, tl.sum(g * (delta * u)[:, None, :], axis=2), mask=mask_bc)
        tl.store(dC_part_ptr + part_offs, tl.sum(hs * dy[:, None, :], axis=2), mask=mask_bc)

    tl.store(dA_part_ptr + pid_b * N * D + offs_n[:, None] * D + offs_d[None, :], dA_acc, mask=mask_nd)
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * D + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_b * D + offs_d, dbias_acc, mask=mask_d)


def _config(u: Tensor) -> dict:
    return CUDA_CONFIG if u.is_cuda else INTERPRETER_CONFIG


def _launch_args(u: Tensor, A: Tensor) -> dict:
    n = A.shape[1]
    return dict(N=n, N_PAD=triton.next_power_of_2(n), **_config(u))


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x


@torch.library.custom_op("star::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
    delta_softplus: bool, reverse: bool, save_states: bool,
) -> tuple[Tensor, Tensor]:
    b, l, d = u.shape
    n = A.shape[1]
    n_chunks = triton.cdiv(l, _config(u)["CHUNK"])
    y = torch.empty_like(u)
    ckpt = u.new_empty((b, n_chunks, n, d) if save_states else (0,), dtype=torch.float32)
    grid = (b, triton.cdiv(d, _config(u)["BLOCK_D"]))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, _empty_if_none(D, u), _empty_if_none(z, u), _empty_if_none(delta_bias, u), y, ckpt,
        l, d, n_chunks, **_launch_args(u, A),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        REVERSE=reverse, SAVE_STATES=save_states,
    )
    return y, ckpt


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_states):
    b, l, d = u.shape
    ckpt_shape = (b, math.ceil(l / _config(u)["CHUNK"]), A.shape[1], d) if save_states else (0,)
    return torch.empty_like(u), u.new_empty(ckpt_shape, dtype=torch.float32)


@torch.library.custom_op("star::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], ckpt: Tensor,
    delta_softplus: bool, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns du, ddelta, dA, dB, dC, dD, dz, d_delta_bias; the last three are empty when unused."""
    b, l, d = u.shape
    n = A.shape[1]
    config = _config(u)
    n_dblocks = triton.cdiv(d, config["BLOCK_D"])
    f32 = dict(dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA_part = u.new_empty((b, n, d), **f32)
    dB_part = u.new_empty((b, n_dblocks, l, n), **f32)
    dC_part = u.new_empty((b, n_dblocks, l, n), **f32)
    dD_part = u.new_empty((b, d) if D is not None else (0,), **f32)
    dbias_part = u.new_empty((b, d) if delta_bias is not None else (0,), **f32)
    _scan_bwd_kernel[(b, n_dblocks)](
        u, delta, A, B, C, _empty_if_none(D, u), _empty_if_none(z, u), _empty_if_none(delta_bias, u),
        dy, ckpt, du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
        l, d, triton.cdiv(l, config["CHUNK"]), **_launch_args(u, A),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        REVERSE=reverse,
    )
    dA = dA_part.sum(0).t().contiguous().to(A.dtype)  # fake impl promises A's contiguous layout
    dB = dB_part.sum(1).to(B.dtype)
    dC = dC_part.sum(1).to(C.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


@_selective_scan_bwd.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, reverse):
    empty = u.new_empty(0)
    return (
        torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
        empty if D is None else torch.empty_like(D), empty if z is None else torch.empty_like(z),
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


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, length, channels), got shape {tuple(u.shape)}")
    b, l, d = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (channels={d}, d_state), got shape {tuple(A.shape)}")
    expected = {"delta": (delta, (b, l, d)), "B": (B, (b, l, A.shape[1])), "C": (C, (b, l, A.shape[1])),
                "D": (D, (d,)), "z": (z, (b, l, d)), "delta_bias": (delta_bias, (d,))}
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x is not None and x.device != u.device:
            raise ValueError(f"{name} is on {x.device} but u is on {u.device}")


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True, reverse: bool = False,
) -> Tensor:
    """Fused selective scan; same contract as `star.ops.selective_scan` (layout (b, l, d)), output in u's dtype."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    u, delta, A, B, C, D, z, delta_bias = [x.contiguous() if x is not None else None for x in tensors]
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    y, _ = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_states)
    return y
