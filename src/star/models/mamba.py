"""The Vision Mamba building blocks shared by pretraining and fine-tuning.

A `MambaMLPBlock` is pre-norm Mamba mixer + pre-norm SwiGLU, each behind a residual. The mixer scans its
sequence in `num_directions` orders: 1 (causal, for autoregressive pretraining) or 4 (rows and columns,
forward and backward, for classification). Every direction owns its conv1d, x_proj, dt_proj, A_log and D
(`mixer.directions.<i>.*`); in_proj and out_proj are shared. Direction 0 is always the plain forward scan,
which is what lets a pretrained 1-direction mixer seed all four directions of a classifier.

The directions run as one batch: every direction reads in_proj's (b, l) output (the conv's shared input and the
scan's shared gate, star.ops.groups, never repeated into a copy), and the conv, projections and scan run once
over the (directions * b, l) sequences with grouped (per-direction) parameters. The tokens stay in their own
order: the conv and the scan take each direction's scan order as a table of rows (star.ops.orders) and the
Triton kernels visit the rows in it, so no permuted copy is made and the directions' outputs are averaged
position by position (the PyTorch forms, which would gather and scatter in every op, get the mixer's two inputs
repeated and gathered into scan order once instead). A reversed order is the reversed table. On a GPU this is a
few large kernels instead of a dozen small ones per direction, which is what bounds small models.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

from star.ops import causal_conv1d, layer_norm, selective_scan, swiglu
from star.ops.groups import repeat_runs, stack_directions
from star.ops.impls import IMPLS, compiled_form, is_triton, load_triton_op
from star.ops.orders import check_permutations, from_scan_order, to_scan_order

# what a block recomputes in backward instead of keeping for it: nothing; the mixer from in_proj's output
# (conv, x_proj and dt, whose outputs and saved tensors are most of a block's; on the Triton kernels the scan keeps
# its segment states and does not run again, star.ops.triton.mixer_scan; elsewhere it reruns too); or the
# whole block from its input
RECOMPUTE = ("none", "mixer", "block")


def recomputed(fn, recompute: bool, *args):
    """`fn(*args)`; with `recompute` (while gradients are on) backward keeps only the inputs and reruns `fn`
    (non-reentrant `torch.utils.checkpoint`, which replays the RNG state)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def scan_orders(orders: Sequence[torch.Tensor]) -> torch.Tensor:
    """The scan-order table (directions, l) of a multi-direction mixer from one permutation of range(l) per
    direction (e.g. rows, reversed rows, columns): row g lists the token positions direction g visits. Checked
    here, once, so that the ops need not check it on every call (star.ops.orders)."""
    index = torch.stack(list(orders))
    if index.dim() != 2:
        raise ValueError(f"scan orders must be 1-d permutations of range(length), got shape {tuple(index.shape)}")
    if index.device.type != "meta":  # meta: models built for counting parameters
        check_permutations(index)
    return index


class SelectiveSSM(nn.Module):
    """The parameters of one scan direction: causal conv1d + SiLU, input-dependent (dt, B, C), and the
    selective scan's A and D. `MambaMixer` runs all its directions together (see the module docstring)."""

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 16,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)  # weights only (MambaMixer._scan)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

        # Mamba's init: dt_proj keeps dt = softplus(bias) log-uniform in [dt_min, dt_max] at the start of training.
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


class MambaMixer(nn.Module):
    """Mamba-1 mixer (expand 1, no bias on in/out projections) over one or several scan directions."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 num_directions: int = 1, depth: int = 1, scan_impl: str = "auto", recompute_scan: bool = False):
        super().__init__()
        d_inner = expand * dim
        if scan_impl not in IMPLS:
            raise ValueError(f"scan_impl must be one of {IMPLS}, got {scan_impl!r}")
        self.scan_impl, self.recompute_scan = scan_impl, recompute_scan
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.directions = nn.ModuleList(
            SelectiveSSM(d_inner, d_state, d_conv, dt_rank=math.ceil(dim / 16)) for _ in range(num_directions))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        with torch.no_grad():  # residual branches start small in deep stacks (Mamba/GPT-2 rescaling)
            self.out_proj.weight /= math.sqrt(depth)

    def forward(self, x: torch.Tensor, orders: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, l, dim). `orders`: the (directions, l) scan-order table (`scan_orders`); None scans a 1-direction
        mixer in token order."""
        xz = self.in_proj(x)
        b, l, _ = xz.shape
        num = len(self.directions)
        if orders is None:
            if num != 1:
                raise ValueError(f"a {num}-direction mixer needs its scan orders")
        else:
            if tuple(orders.shape) != (num, l):
                raise ValueError(f"scan orders must be (directions, tokens) = ({num}, {l}), got {tuple(orders.shape)}")
        kernels = is_triton("selective_scan", self.scan_impl, xz)  # which recompute themselves (in _scan)
        y = recomputed(self._scan, self.recompute_scan and not kernels, *xz.chunk(2, dim=-1), num, orders, kernels)
        if num > 1:
            y = y.view(num, b, l, -1).mean(0)
        return self.out_proj(y)

    def _scan(self, x: torch.Tensor, z: torch.Tensor, num: int, orders: Optional[torch.Tensor],
              kernels: bool) -> torch.Tensor:
        """Conv, projections and scan of the (b, l, d) halves of in_proj's output, once per direction: run g of
        the (num * b, l, d) result with direction g's parameters along scan order g. `kernels`: the scan is
        the Triton kernel (`is_triton`)."""
        dirs = self.directions
        ssm = dirs[0]

        params = [t for s in dirs for t in (s.conv1d.weight, s.conv1d.bias, s.x_proj.weight, s.dt_proj.weight,
                                            s.A_log, s.D, s.dt_proj.bias)]  # in star.ops.groups.DIRECTION_PARAMS' order
        if kernels:  # the ops below as one autograd function, which reads the scan orders and x, z in place
            return load_triton_op("mixer_scan")(x, z, params, ssm.dt_rank, orders, shared=num > 1,
                                                recompute=self.recompute_scan)
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias = stack_directions(params)
        A = -torch.exp(A_log)
        # The PyTorch forms would gather and scatter in each op (conv and scan), so the mixer puts its two inputs in
        # scan order once, one run per direction, and its output back.
        if orders is not None:
            x, z = (to_scan_order(repeat_runs(t, num * t.shape[0]), orders) for t in (x, z))
        impl = self.scan_impl
        x = causal_conv1d(x, conv_weight, conv_bias, activation="silu", impl=impl)
        n, l, d = x.shape
        dt_bc = torch.bmm(x.reshape(num, -1, d), x_proj_weight.transpose(1, 2))
        dt, B, C = dt_bc.split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        delta = torch.bmm(dt, dt_proj_weight.transpose(1, 2))  # bias added (fp32) in the scan
        y = selective_scan(x, delta.reshape(n, l, d), A, B.reshape(n, l, -1), C.reshape(n, l, -1), D, z=z,
                           delta_bias=delta_bias, delta_softplus=True, impl=impl)
        return from_scan_order(y, orders) if orders is not None else y


class SwiGLU(nn.Module):
    """fc2(silu(fc1_g(x)) * fc1_x(x)) with timm's SwiGLU parameter names (checkpoints load either way), run as
    one packed fc1 matmul and one gate op (`star.ops.swiglu`) that keeps only the matmul's output for backward
    (under torch.compile, the gate's reference form for inductor to fuse: `star.ops.impls.compiled_form`)."""

    def __init__(self, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = F.linear(x, torch.cat([self.fc1_g.weight, self.fc1_x.weight]),
                      torch.cat([self.fc1_g.bias, self.fc1_x.bias]))
        return self.fc2(swiglu(gx, impl=compiled_form(self.impl)))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) whose output is in the autocast dtype while autocast is on, written by the
    norm itself (`star.ops.layer_norm`) instead of an fp32 output that the next matmul casts. Under torch.compile
    the norm's reference form, for inductor to fuse with the residual add before it (`compiled_form`)."""

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "auto"):
        super().__init__(dim, eps=eps)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype, impl=compiled_form(self.impl))


class MambaMLPBlock(nn.Module):
    """x + DropPath(Mamba(LN(x))), then x + DropPath(SwiGLU(LN(x))); `recompute` (see RECOMPUTE) trades
    backward compute for activation memory."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1, num_directions: int = 1,
                 depth: int = 1, drop_path: float = 0.0, scan_impl: str = "auto", recompute: str = "none"):
        super().__init__()
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        self.recompute_block = recompute == "block"
        self.norm1 = LayerNorm(dim, impl=scan_impl)
        self.mixer = MambaMixer(dim, d_state, d_conv, expand, num_directions, depth, scan_impl,
                                recompute_scan=recompute == "mixer")
        self.norm2 = LayerNorm(dim, impl=scan_impl)
        self.mlp = SwiGLU(dim, int(dim * 4 * 2 / 3), scan_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, orders: Optional[torch.Tensor] = None) -> torch.Tensor:
        return recomputed(self._forward, self.recompute_block, x, orders)  # DropPath's draw replays with the RNG

    def _forward(self, x: torch.Tensor, orders: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), orders))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def build_blocks(dim: int, depth: int, num_directions: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 drop_path_rate: float = 0.0, scan_impl: str = "auto", recompute: str = "none") -> nn.ModuleList:
    """`depth` blocks with stochastic depth rising linearly from 0 to `drop_path_rate`."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(MambaMLPBlock(dim, d_state, d_conv, expand, num_directions, depth, rate, scan_impl, recompute)
                         for rate in rates)


def no_weight_decay_names(model: nn.Module) -> set:
    """Names of the SSM parameters (A_log, D) and learned tokens that take no weight decay."""
    return {name for name, _ in model.named_parameters()
            if name.rsplit(".", 1)[-1] in ("A_log", "D", "cls_token", "separator", "mask_token")}
