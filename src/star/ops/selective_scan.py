"""Mamba-1 selective scan in plain PyTorch, in (batch, length, channels) layout.

    delta' = softplus(delta + delta_bias)                       (or delta + delta_bias)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t  (h: (batch, d, d_state), h_{-1} = 0)
    y_t    = sum_n C_t[n] * h_t[..., n] + D * u_t,   then y *= silu(z)

The state and every accumulation are float32 (float64 for float64 inputs), whatever the input dtype,
and autocast is switched off inside so that bf16 training cannot push the recurrence into bf16.
`selective_scan` is the one entry point the models use: it validates shapes once and dispatches to
the sequential reference, the chunked CPU form, or the Triton kernels (star.ops.triton).

Grouped parameters (star.ops.groups): A may be (groups, d, d_state) and D, delta_bias (groups, d). The batch
then holds `groups` equal runs of sequences, and run g uses parameter set g. This is how the 4-direction
mixer scans all its directions in one call, each with its own A, D and dt bias.
"""
import functools

import torch
import torch.nn.functional as F

from .groups import param_groups
from .impls import check_sequences, check_shape, implementation, register_op
from .orders import check_order, in_scan_order

# Steps per chunk of `selective_scan_chunked`, from forward+backward timings on 2 CPU cores (float32,
# d=192, n=16, chunk sizes 4-32 tried): 16 ties the sequential reference at (b=64, l=272), where each
# step's tensors are already large, and is 1.9x faster than it at (b=8, l=640), where per-op overhead rules.
CHUNK_SIZE = 16


def _no_autocast(fn):
    """Run `fn` with autocast off on the inputs' device: the scan manages its own precision."""
    @functools.wraps(fn)
    def wrapper(u, *args, **kwargs):
        with torch.autocast(u.device.type, enabled=False):
            return fn(u, *args, **kwargs)
    return wrapper


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sequence(A, D, delta_bias, batch: int):
    """Grouped parameters (A: (groups, d, n)) as one row per sequence with a time axis, (batch, 1, ...), which
    broadcasts over (batch, length, ...); row i is group i // (batch // groups). Ungrouped ones pass through."""
    if A.dim() == 2:
        return A, D, delta_bias
    return tuple(None if p is None else p.repeat_interleave(batch // p.shape[0], dim=0).unsqueeze(1)
                 for p in (A, D, delta_bias))


def _effective_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta  # softplus threshold is 20, as in Mamba


def _skip_and_gate(y, u, D, z):
    """Add the D skip and apply the SiLU(z) gate in y's (compute) dtype; return u's dtype."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def _ssm_step(h, u_t, delta_t, A, B_t, C_t):
    """One step of the recurrence on (batch, d) inputs: returns the new state and the output before D/z."""
    h = torch.exp(delta_t.unsqueeze(-1) * A) * h + (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)
    return h, torch.einsum("bdn,bn->bd", h, C_t)


@in_scan_order("u", "delta", "B", "C", "z")
@_no_autocast
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       reverse=False):
    """Ground truth: one `_ssm_step` per time step, in time order (or backwards when `reverse`).

    No shape checks here; go through `selective_scan` for those.
    """
    dtype = _compute_dtype(u)
    A, D, delta_bias = _per_sequence(A, D, delta_bias, u.shape[0])
    delta = _effective_delta(delta, delta_bias, delta_softplus, dtype)
    A = A.to(dtype).squeeze(1) if A.dim() == 4 else A.to(dtype)  # per step: (batch, d, n) or (d, n)
    steps = list(zip(u.to(dtype).unbind(1), delta.unbind(1), B.to(dtype).unbind(1), C.to(dtype).unbind(1)))
    if reverse:
        steps.reverse()
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1], dtype=dtype)
    ys = []
    for u_t, delta_t, B_t, C_t in steps:
        h, y_t = _ssm_step(h, u_t, delta_t, A, B_t, C_t)
        ys.append(y_t)
    if reverse:
        ys.reverse()
    return _skip_and_gate(torch.stack(ys, dim=1), u, D, z)


@in_scan_order("u", "delta", "B", "C", "z")
@_no_autocast
def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           reverse=False, chunk_size=CHUNK_SIZE):
    """Chunked scan for CPU: whole-chunk tensor ops, with only a fused multiply-add left per time step.

    Per chunk of `chunk_size` steps, the decays exp(delta' * A) and inputs delta' * B * u are formed for
    all steps at once, the state runs through the chunk with one `addcmul` per step, and the outputs
    are contracted with C for the whole chunk. The state is carried between chunks; `reverse` walks the
    chunks, and the steps inside each, from the end. Plain autograd differentiates it; memory is
    O(batch * length * d * d_state), like the saved states of any autograd scan.

    Why sequential inside the chunk: the SSD-style alternative (cumulative sums S of delta' * A in a
    chunk, every decay written as exp(S_t - S_s), t >= s) needs a (batch, L, L, d, d_state) decay tensor,
    because Mamba-1's decay differs per channel and state. Measured on CPU at (b=64, l=272, d=192, n=16)
    and (b=8, l=640) it was 4-8x slower than a sequential scan. The sequential form has the same
    stability property: each exponent is the one-step difference S_t - S_{t-1} = delta'_t * A <= 0
    (delta' >= 0, A <= 0), so nothing is ever scaled up and rescaled, and no exponent is positive.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of steps, got {chunk_size}")
    dtype = _compute_dtype(u)
    A, D, delta_bias = _per_sequence(A, D, delta_bias, u.shape[0])
    delta = _effective_delta(delta, delta_bias, delta_softplus, dtype)
    A = A.to(dtype)
    chunks = list(zip(*(t.split(chunk_size, dim=1) for t in (u.to(dtype), delta, B.to(dtype), C.to(dtype)))))
    order = range(len(chunks) - 1, -1, -1) if reverse else range(len(chunks))
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1], dtype=dtype)
    ys = [None] * len(chunks)
    for i in order:
        u_c, delta_c, B_c, C_c = chunks[i]
        decay = torch.exp(delta_c.unsqueeze(-1) * A)                 # (b, L, d, n), exponents <= 0
        inputs = (delta_c * u_c).unsqueeze(-1) * B_c.unsqueeze(2)    # (b, L, d, n)
        steps = list(zip(decay.unbind(1), inputs.unbind(1)))
        if reverse:
            steps.reverse()
        states = []
        for decay_t, input_t in steps:
            h = torch.addcmul(input_t, decay_t, h)
            states.append(h)
        if reverse:
            states.reverse()
        ys[i] = torch.einsum("bldn,bln->bld", torch.stack(states, dim=1), C_c)
    return _skip_and_gate(torch.cat(ys, dim=1), u, D, z)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   reverse=False, impl="auto", order=None):
    """Mamba-1 selective scan (mamba_ssm's `selective_scan_fn`) in (batch, length, d) layout.

    Args:
        u, delta: (batch, length, d). A: (d, d_state), negative. B, C: (batch, length, d_state).
        D, delta_bias: (d,) or None.
        Grouped: A (groups, d, d_state), D and delta_bias (groups, d); sequence i of the batch uses group
            i // (batch // groups) (see the module docstring).
        z: (batch, length, d) or None, gates the output with SiLU(z); with grouped parameters also
            (batch // groups, length, d), one run of gates that every group's run shares (as if repeated).
        delta_softplus: apply softplus to delta + delta_bias.
        reverse: run the recurrence from the last step to the first (outputs stay in input order).
        order: None, or an integer (length,) or (groups, length) scan order (star.ops.orders): scan position p
            of a sequence in group g reads and writes time row order[g, p]; with `reverse`, the order backwards.
        impl: "ref" (sequential, ground truth), "chunked" (CPU default), "triton" (star.ops.triton, fp32
            math: not for float64 inputs), or "auto" (Triton for CUDA tensors when it imports, unless they
            are float64; else "chunked").
    Returns:
        y: (batch, length, d) in u's dtype.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, order)
    return implementation("selective_scan", impl, u)(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                     delta_softplus=delta_softplus, reverse=reverse, order=order)


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, order=None) -> None:
    """The shapes, dtypes and devices of `selective_scan`'s inputs (every implementation's contract)."""
    batch, length, d = check_sequences("u", u)
    check_shape("delta", delta, u.device, batch=batch, length=length, d=d)
    if not isinstance(A, torch.Tensor) or A.dim() not in (2, 3):
        raise ValueError(f"A must be a (d, d_state) or (groups, d, d_state) tensor with d = {d}, got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    d_state = A.shape[-1]
    groups = {} if A.dim() == 2 else {"groups": A.shape[0]}
    check_shape("A", A, u.device, **groups, d=d, d_state=d_state)
    param_groups(A, 2, batch, "parameter groups of A")
    check_shape("B", B, u.device, batch=batch, length=length, d_state=d_state)
    check_shape("C", C, u.device, batch=batch, length=length, d_state=d_state)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, u.device, **groups, d=d)
    if z is not None:  # one gate per sequence, or (grouped) one run of them shared by every group's run
        shared = A.dim() == 3 and A.shape[0] > 1 and z.shape[0] * A.shape[0] == batch
        check_shape("z", z, u.device, batch=batch // A.shape[0] if shared else batch, length=length, d=d)
    if order is not None:
        check_order(order, batch, length, u.device)


register_op("selective_scan", ref=selective_scan_ref, chunked=selective_scan_chunked,
            triton="selective_scan_triton_unchecked")


@_no_autocast
def _state_update(u, state, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = _effective_delta(delta, delta_bias, delta_softplus, state.dtype)
    new_state, y = _ssm_step(state, u.to(state.dtype), delta, A.to(state.dtype), B.to(state.dtype),
                             C.to(state.dtype))
    return _skip_and_gate(y, u, D, z), new_state


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """One recurrent step of `selective_scan` for incremental decoding; functional (state is not modified).

    Args:
        state: (batch, d, d_state), float32 or float64. u, delta, z: (batch, d). B, C: (batch, d_state).
        A: (d, d_state). D, delta_bias: (d,) or None.
    Returns:
        (y, new_state): y (batch, d) in u's dtype; new_state like state.
    """
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        raise ValueError(f"state must be a (batch, d, d_state) tensor, got "
                         f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be float32 or float64 (the scan keeps its state in full precision), "
                         f"got {state.dtype}")
    batch, d, d_state = state.shape
    check_shape("u", u, batch=batch, d=d)
    check_shape("delta", delta, batch=batch, d=d)
    check_shape("A", A, d=d, d_state=d_state)
    check_shape("B", B, batch=batch, d_state=d_state)
    check_shape("C", C, batch=batch, d_state=d_state)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, d=d)
    if z is not None:
        check_shape("z", z, batch=batch, d=d)
    return _state_update(u, state, delta, A, B, C, D, z, delta_bias, delta_softplus)
