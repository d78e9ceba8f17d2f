"""The Triton selective scan with inputs that backward recomputes instead of keeping (the mixer's
`recompute="mixer"` on the kernels, the role mamba_ssm's `mamba_inner_fn` plays for its CUDA kernels).

`make_inputs(x, *weights)` builds the scan's (u, delta, B, C) from a block's activation x: in the mixer, the
conv with SiLU and the x_proj/dt_proj matmuls. Forward runs it and the scan without keeping anything of it
but the scan's segment states; backward runs `make_inputs` again with gradients on, takes the scan's
backward kernel from the kept states (the scan's forward does not run again) and sends its input gradients
back through the recomputed graph. What stays alive between forward and backward is x, the weights, the
scan's parameters, its gate z and its states; not u, delta, B, C or the conv's and matmuls' saved tensors.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from star.ops.orders import order_table
from star.ops.triton.selective_scan import _channels_contiguous, _selective_scan_bwd, _selective_scan_fwd


def _kernel_layout(u, delta, A, B, C, D, z, delta_bias):
    """The layouts the kernels read, as `selective_scan_triton_unchecked` gives them."""
    u, delta, z = (_channels_contiguous(t) for t in (u, delta, z))
    A, B, C, D, delta_bias = (t.contiguous() if t is not None else None for t in (A, B, C, D, delta_bias))
    return u, delta, A, B, C, D, z, delta_bias


class _ScanOfRecomputedInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, make_inputs, delta_softplus, order, A, D, z, delta_bias, x, *weights):
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        u, delta, B, C = make_inputs(x, *weights)
        order = order_table(order) if order is not None else None
        y, ckpt = _selective_scan_fwd(*_kernel_layout(u, delta, A, B, C, D, z, delta_bias), order, delta_softplus,
                                      False, True)
        ctx.save_for_backward(x, A, D, z, delta_bias, order, ckpt, *weights)
        ctx.make_inputs, ctx.delta_softplus = make_inputs, delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, D, z, delta_bias, order, ckpt, *weights = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        leaves = [t.detach().requires_grad_() for t in (x, *weights)]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):  # forward's numerics
            u, delta, B, C = ctx.make_inputs(*leaves)
        u_, delta_, A, B_, C_, D, z, delta_bias = _kernel_layout(u.detach(), delta.detach(), A, B.detach(),
                                                                 C.detach(), D, z, delta_bias)
        du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
            dy.contiguous(), u_, delta_, A, B_, C_, D, z, delta_bias, order, ckpt, ctx.delta_softplus, False)
        grads = torch.autograd.grad((u, delta, B, C), leaves, (du, ddelta, dB, dC), allow_unused=True)
        return (None, None, None, dA, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, *grads)


def selective_scan_recomputing_inputs(make_inputs: Callable, x: Tensor, weights, A: Tensor,
                                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                                      order: Optional[Tensor] = None) -> Tensor:
    """`selective_scan(*make_inputs(x, *weights), A, D, z, delta_bias, delta_softplus, order=order)` on the
    Triton kernels, with the scan's inputs recomputed in backward (module docstring). No shape checks: the
    caller (the mixer) builds the inputs itself."""
    return _ScanOfRecomputedInputs.apply(make_inputs, delta_softplus, order, A, D, z, delta_bias, x, *weights)
