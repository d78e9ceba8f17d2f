"""The mixer's conv, projections and scan on the Triton kernels as one autograd function (the role mamba_ssm's
`mamba_inner_fn` plays for its CUDA kernels), with the scan's inputs kept for backward or recomputed there
(`recompute="mixer"`).

From x (in_proj's first half, (b, l, d)):

    u = silu(conv(x)),  [dt | B | C] = u @ x_proj^T,  delta = dt @ dt_proj^T,  y = scan(u, delta, A, B, C, D, z)

with grouped (per-direction) weights, as `star.models.mamba.MambaMixer._scan` composes them on the PyTorch forms.
One function instead of the conv's, the matmuls' and the scan's autograd nodes and custom-op wrappers, and of the
ops that stack the directions' parameters and take A = -exp(A_log): less work for the host per step (in one H100
call the eager STAR-B pretraining step's time followed its host time, docs/benchmarks). Forward keeps x, the
stacked weights, the scan's parameters, its gate z and its segment states, and, unless recomputing, u,
[dt | B | C] and delta. Backward (rerunning the conv and the matmuls in the forward's dtypes where recomputing)
runs the scan's backward kernel from the kept states (the scan's forward does not run again) and takes the
gradients through the matmuls and the conv by hand: the ops autograd would run, so the gradients are those of the
composed ops, and no autograd call inside backward (which would break a torch.compile graph at every block).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from star.ops.groups import DIRECTION_PARAMS, stack_directions
from star.ops.orders import order_table
from star.ops.triton.causal_conv1d import _causal_conv1d_bwd, _causal_conv1d_fwd, check_kernel_size
from star.ops.triton.selective_scan import _selective_scan_bwd, _selective_scan_fwd, kernel_layout


def _operands(u, x_proj_weight, dt_proj_weight, mm_dtype):
    """The matmuls' operands in their dtype, grouped: u as (groups, b * l, d), x_proj and dt_proj."""
    return (u.reshape(x_proj_weight.shape[0], -1, u.shape[-1]).to(mm_dtype), x_proj_weight.to(mm_dtype),
            dt_proj_weight.to(mm_dtype))


def _scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, order, shared, dt_rank, mm_dtype):
    """u, [dt | B | C] and delta (grouped: (groups, b * l, ...))."""
    u = _causal_conv1d_fwd(x, conv_weight, conv_bias, "silu", False, order, shared)
    u_mm, x_proj, dt_proj = _operands(u, x_proj_weight, dt_proj_weight, mm_dtype)
    dt_bc = torch.bmm(u_mm, x_proj.transpose(1, 2))
    delta = torch.bmm(dt_bc[..., :dt_rank], dt_proj.transpose(1, 2))
    return u, dt_bc, delta


def _scan_layout(u, delta, A, dt_bc, D, z, delta_bias, dt_rank):
    """The scan's (u, delta, A, B, C, D, z, delta_bias) in (b, l, ...) layout as its kernels read them."""
    n_state = (dt_bc.shape[-1] - dt_rank) // 2
    b, l, d = u.shape
    B, C = [t.reshape(b, l, n_state) for t in dt_bc[..., dt_rank:].split(n_state, dim=-1)]
    return kernel_layout(u, delta.reshape(b, l, d), A, B, C, D, z, delta_bias)


class _MixerScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, order, shared, dt_rank, recompute, grad_enabled, *params):
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias = stack_directions(params)
        check_kernel_size(conv_weight)
        A = -torch.exp(A_log)
        conv_weight = conv_weight.contiguous()
        device = x.device.type
        enabled = torch.is_autocast_enabled(device)
        mm_dtype = torch.get_autocast_dtype(device) if enabled else x.dtype
        if not enabled and x_proj_weight.dtype != x.dtype:  # as the composed ops' bmm refuses them
            raise RuntimeError(f"the mixer's activations are {x.dtype} but its weights {x_proj_weight.dtype}: run it "
                               f"under autocast or in one dtype")
        order = order_table(order) if order is not None else None
        with torch.autocast(device, enabled=False):  # the matmuls run in mm_dtype, as autocast would run them
            u, dt_bc, delta = _scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, order, shared,
                                           dt_rank, mm_dtype)
            y, ckpt = _selective_scan_fwd(*_scan_layout(u, delta, A, dt_bc, D, z, delta_bias, dt_rank), order, True,
                                          False, grad_enabled and any(ctx.needs_input_grad))  # states for backward
        kept = () if recompute else (u, dt_bc, delta)
        ctx.save_for_backward(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias, order,
                              ckpt, *kept)
        ctx.shared, ctx.dt_rank, ctx.mm_dtype, ctx.recompute = shared, dt_rank, mm_dtype, recompute
        ctx.num = len(params) // DIRECTION_PARAMS
        return y

    @staticmethod
    def backward(ctx, dy):
        x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias, order, ckpt, *kept = \
            ctx.saved_tensors
        shared, dt_rank = ctx.shared, ctx.dt_rank
        # The matmuls' operands are cast to the forward's dtype by hand. Backward runs outside autocast (the trainer
        # calls it there; autograd's CUDA threads do not inherit it), and switching autocast off here would break
        # a torch.compile trace whose forward entered autocast; an autocast of the forward's dtype changes nothing.
        if ctx.recompute:
            u, dt_bc, delta = _scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, order, shared,
                                           dt_rank, ctx.mm_dtype)
        else:
            u, dt_bc, delta = kept
        u_mm, x_proj, dt_proj = _operands(u, x_proj_weight, dt_proj_weight, ctx.mm_dtype)
        du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
            dy.contiguous(), *_scan_layout(u, delta, A, dt_bc, D, z, delta_bias, dt_rank), order, ckpt, True,
            False)
        # delta = dt @ dt_proj^T and [dt | B | C] = u @ x_proj^T, backwards, as autograd's bmm backward runs them
        groups = x_proj.shape[0]
        ddelta = ddelta.reshape(groups, -1, ddelta.shape[-1])
        d_dt_bc = torch.cat([torch.bmm(ddelta, dt_proj), dB.reshape(groups, -1, dB.shape[-1]),
                             dC.reshape(groups, -1, dC.shape[-1])], dim=-1)
        d_dt_proj = torch.bmm(dt_bc[..., :dt_rank].transpose(1, 2), ddelta).transpose(1, 2)
        d_x_proj = torch.bmm(u_mm.transpose(1, 2), d_dt_bc).transpose(1, 2)
        du = du + torch.bmm(d_dt_bc, x_proj).reshape(du.shape).to(du.dtype)
        dx, d_conv_weight, d_conv_bias = _causal_conv1d_bwd(du.contiguous(), x, conv_weight, conv_bias, "silu",
                                                            False, order, shared)
        # A = -exp(A_log): dA_log = dA * A, the product autograd's exp and neg backward take (bit for bit)
        grads = (d_conv_weight, d_conv_bias if conv_bias is not None else None, d_x_proj.to(x_proj_weight.dtype),
                 d_dt_proj.to(dt_proj_weight.dtype), dA * A, dD if D is not None else None,
                 dbias if delta_bias is not None else None)
        per_direction = []
        for g in range(ctx.num):  # each direction's share, in its parameter's shape
            per_direction += [None if grad is None else grad[g].unsqueeze(1) if i == 0 else grad[g]
                              for i, grad in enumerate(grads)]
        return (dx, dz if z is not None else None, None, None, None, None, None, *per_direction)


def mixer_scan(x: Tensor, z: Optional[Tensor], params: Sequence[Optional[Tensor]], dt_rank: int,
               order: Optional[Tensor] = None, shared: bool = False, recompute: bool = False) -> Tensor:
    """The scan's output y from in_proj's halves x and z (module docstring), softplus on delta + delta_bias.
    `params`: each direction's parameters as `star.models.mamba.SelectiveSSM` holds them, flat (`stack_directions`):
    conv1d weight (d, 1, k) and bias (d,) or None, x_proj weight (dt_rank + 2 n, d), dt_proj weight (d, dt_rank),
    A_log (d, n), D (d,) or None, dt_proj bias (d,) or None; run g of the output uses direction g's. `shared`: x
    and z are one run of sequences that every direction reads; `recompute`: rerun the conv and the matmuls in
    backward instead of keeping their outputs. No shape checks: the caller (the mixer) builds the inputs itself."""
    # grad mode is off inside forward: whether a backward can follow is asked here
    return _MixerScan.apply(x, z, order, shared, dt_rank, recompute, torch.is_grad_enabled(), *params)
