"""Depthwise causal conv1d of the Mamba mixer, in (batch, length, d) layout.

    y[t] = bias + sum_j weight[:, j] * x[t - (k - 1) + j]     (zeros before the start), then SiLU

`reverse=True` is the anti-causal mirror, flip(conv(flip(x))), for backward scans of a sequence in place:
padding goes on the right and the (tiny) kernel's taps are reversed, so the sequence is never flipped.
Grouped weights, (groups, d, k) with bias (groups, d), work as in `selective_scan`: the batch holds
`groups` equal runs of sequences and run g is filtered with weight set g.
"""
import torch
import torch.nn.functional as F

from .groups import param_groups, repeat_runs
from .impls import check_sequences, check_shape, implementation, register_op
from .orders import check_order, in_scan_order

ACTIVATIONS = (None, "silu")


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(x, weight, bias=None, activation=None, reverse=False, order=None, shared=False):
    """F.conv1d with explicit one-sided padding (a shared input repeated into one run per weight group first).
    No shape checks here; use `causal_conv1d`."""
    if shared:
        x = repeat_runs(x, x.shape[0] * weight.shape[0])
    return _conv1d_in_scan_order(x, weight, bias, activation, reverse, order=order)


@in_scan_order("x")
def _conv1d_in_scan_order(x, weight, bias, activation, reverse):
    """`causal_conv1d_ref` without a shared input.

    Grouped weights run as one conv over groups * d channels: (batch, l, d) is viewed as
    (batch // groups, groups * d, l), so group g's sequences meet group g's filters."""
    k = weight.shape[-1]
    groups = weight.shape[0] if weight.dim() == 3 else 1
    batch, length, d = x.shape
    weight = weight.to(x.dtype).reshape(groups * d, k)
    bias = None if bias is None else bias.to(x.dtype).reshape(groups * d)
    padding = (0, k - 1) if reverse else (k - 1, 0)
    taps = weight.flip(-1) if reverse else weight
    channels_first = x.view(groups, batch // groups, length, d).permute(1, 0, 3, 2).reshape(-1, groups * d, length)
    y = F.conv1d(F.pad(channels_first, padding), taps.unsqueeze(1), bias, groups=groups * d)
    if activation == "silu":
        y = F.silu(y)
    if groups == 1:
        return y.transpose(1, 2)
    return y.view(batch // groups, groups, d, length).permute(1, 0, 3, 2).reshape(batch, length, d)


def causal_conv1d(x, weight, bias=None, activation=None, reverse=False, impl="auto", order=None, shared=False):
    """Depthwise causal (or, with `reverse`, anti-causal) conv1d.

    Args:
        x: (batch, length, d). weight: (d, k), or (groups, d, k) (see the module docstring).
        bias: (d,), (groups, d) or None. activation: None or "silu".
        order: None, or an integer (length,) or (groups, length) scan order (star.ops.orders): the conv runs
            along each sequence's rows in that order (causal in scan order), inputs and output in stored order.
        shared: with grouped weights, x is one run of sequences that every group filters: the output holds
            groups * batch sequences, run g filtered with set g, as if x had been repeated (the kernel reads it
            in place; the 4-direction mixer's x, which every direction scans).
        impl: "ref" or "chunked" (both F.conv1d), "triton" (star.ops.triton), or "auto" (Triton for CUDA
            tensors when it imports, else F.conv1d).
    Returns:
        y: (batch, length, d) ((groups * batch, length, d) when shared) in x's dtype (for F.conv1d, a transposed
        view of a (batch, d, length) result).
    """
    check_conv_inputs(x, weight, bias, activation, order, shared)
    return implementation("causal_conv1d", impl, x)(x, weight, bias=bias, activation=activation, reverse=reverse,
                                                    order=order, shared=shared)


def check_conv_inputs(x, weight, bias=None, activation=None, order=None, shared=False) -> None:
    """The shapes, dtypes and devices of `causal_conv1d`'s inputs (every implementation's contract)."""
    batch, length, d = check_sequences("x", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3) or weight.shape[-1] < 1:
        raise ValueError(f"weight must be a (d, k) or (groups, d, k) tensor with d = {d} and k >= 1, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    groups = {} if weight.dim() == 2 else {"groups": weight.shape[0]}
    check_shape("weight", weight, x.device, **groups, d=d, k=weight.shape[-1])
    if shared:
        if weight.dim() != 3:
            raise ValueError("shared=True needs grouped weights (groups, d, k): every group filters the shared x")
        batch *= weight.shape[0]  # the output's sequences, one run per group
    param_groups(weight, 2, batch, "weight groups")
    if bias is not None:
        check_shape("bias", bias, x.device, **groups, d=d)
    _check_activation(activation)
    if order is not None:
        check_order(order, batch, length, x.device)


register_op("causal_conv1d", ref=causal_conv1d_ref, chunked=causal_conv1d_ref, triton="causal_conv1d_triton_unchecked")


def causal_conv1d_update(conv_state, x, weight, bias=None, activation=None):
    """One step of `causal_conv1d` (forward direction) for incremental decoding; functional.

    Args:
        conv_state: (batch, d, k - 1), the previous k - 1 inputs, oldest first. x: (batch, d).
        weight: (d, k). bias: (d,) or None. activation: None or "silu".
    Returns:
        (y, new_conv_state): y (batch, d) in x's dtype; new_conv_state like conv_state, x appended.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (batch, d) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch, d = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"weight must be a (d, k) tensor with d = {d} and k >= 1, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    k = weight.shape[1]
    check_shape("x", x, batch=batch, d=d)
    check_shape("weight", weight, d=d, k=k)
    check_shape("conv_state", conv_state, batch=batch, d=d, k_minus_1=k - 1)
    if bias is not None:
        check_shape("bias", bias, d=d)
    _check_activation(activation)

    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (batch, d, k)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:]
