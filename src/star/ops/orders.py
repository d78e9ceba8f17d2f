"""Scan orders: the time rows each sequence visits, so that an op scans tokens in another order in place.

Given `order`, an integer (groups, length) tensor (or (length,), one order for every sequence), the scan and
the conv run sequence i of the batch, in group g = i // (batch // groups), through its time rows in the order
order[g]: scan position p reads row order[g, p] of every per-time input and writes its output at that row. The
result equals gathering every input into scan order, running the op and scattering the output back, without
those copies: the 4-direction mixer scans rows and columns, forwards and backwards, of one token layout (the
Triton kernels read the table; the PyTorch forms do the gather and scatter, `in_scan_order`).
Each row must be a permutation of range(length). That is checked here for CPU tensors outside torch.compile
only (on a GPU it would cost a synchronisation per call, in a compiled graph a graph break);
`star.models.mamba.scan_orders` checks it once where the model builds them.
"""
import functools
import inspect

import torch

from .groups import param_groups, repeat_runs


def check_permutations(order: torch.Tensor) -> None:
    """A ValueError unless every row of `order` is a permutation of range(length) (a sort: not on a hot path)."""
    if not torch.equal(order.sort(dim=-1).values,
                       torch.arange(order.shape[-1], device=order.device).expand_as(order).to(order.dtype)):
        raise ValueError("every scan order must be a permutation of range(length)")


def check_order(order, batch: int, length: int, device: torch.device) -> None:
    """A ValueError unless `order` is an integer (length,) or (groups, length) table on `device`, its groups
    splitting the batch into equal runs, and (CPU tensors, eager) each row a permutation of range(length)."""
    if not isinstance(order, torch.Tensor) or order.dim() not in (1, 2) or order.shape[-1] != length:
        raise ValueError(f"order must be a (length,) or (groups, length) tensor with length = {length}, got "
                         f"{tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__}")
    if order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"order must be an int32 or int64 tensor, got {order.dtype}")
    if order.device != device:
        raise ValueError(f"order is on {order.device} but the sequences are on {device}")
    param_groups(order, 1, batch, "scan orders")
    if order.device.type == "cpu" and not torch.compiler.is_compiling():
        check_permutations(order)


def order_table(order: torch.Tensor) -> torch.Tensor:
    """`order` as the kernels read it: contiguous int32 (groups, length)."""
    return order.reshape(-1, order.shape[-1]).to(torch.int32).contiguous()


def order_launch_args(x: torch.Tensor, order, batch: int) -> dict:
    """The kernels' order arguments for `batch` sequences: the `order_table` (x, unread, without one) and how
    many sequences share each of its rows."""
    return dict(order_ptr=x if order is None else order, seq_per_order=1 if order is None else batch // order.shape[0])


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, length, ...) with the rows of group g's sequences taken in the order index[g]."""
    groups, length = index.shape
    runs = x.reshape(groups, x.shape[0] // groups, length, -1)
    return runs.gather(2, index.long()[:, None, :, None].expand_as(runs)).view_as(x)


def to_scan_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return _gather_rows(x, order.reshape(-1, order.shape[-1]))


def from_scan_order(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return _gather_rows(y, order.reshape(-1, order.shape[-1]).argsort(dim=-1))


def in_scan_order(*time_args: str):
    """Decorator giving a PyTorch op an `order=None` argument: the named per-time arguments are gathered into
    scan order, the op runs, and its output goes back to the stored order. A named argument with fewer
    sequences than the first one (an input shared by the groups' runs, star.ops.groups) is repeated first."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, order=None, **kwargs):
            bound = signature.bind(*args, **kwargs)
            batch = bound.arguments[time_args[0]].shape[0]
            for name in time_args:
                if bound.arguments.get(name) is not None:
                    x = repeat_runs(bound.arguments[name], batch)
                    bound.arguments[name] = x if order is None else to_scan_order(x, order)
            y = fn(*bound.args, **bound.kwargs)
            return y if order is None else from_scan_order(y, order)
        return wrapper
    return wrap
