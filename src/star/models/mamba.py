"""The Vision Mamba building blocks shared by pretraining and fine-tuning.

A `MambaMLPBlock` is pre-norm Mamba mixer + pre-norm SwiGLU, each behind a residual. The mixer scans its
sequence in `num_directions` orders: 1 (causal, for autoregressive pretraining) or 4 (rows and columns,
forward and backward, for classification). Every direction owns its conv1d, x_proj, dt_proj, A_log and D
(`mixer.directions.<i>.*`); in_proj and out_proj are shared. Direction 0 is always the plain forward scan,
which is what lets a pretrained 1-direction mixer seed all four directions of a classifier.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SwiGLU

from star.ops import causal_conv1d, selective_scan

# (permutation of the sequence or None, reverse): how one direction reads the token sequence.
ScanOrder = Tuple[Optional[torch.Tensor], bool]


class SelectiveSSM(nn.Module):
    """One scan direction: causal conv1d + SiLU, input-dependent (dt, B, C), selective scan gated by SiLU(z)."""

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 16,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)  # weights only; see forward
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

    def forward(self, x: torch.Tensor, z: torch.Tensor, reverse: bool = False, impl: str = "auto") -> torch.Tensor:
        conv_impl = "ref" if impl in ("ref", "chunked") else impl
        x = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu", reverse=reverse,
                          impl=conv_impl)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias is added (in fp32) inside the scan
        return selective_scan(x, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True, reverse=reverse, impl=impl)


class MambaMixer(nn.Module):
    """Mamba-1 mixer (expand 1, no bias on in/out projections) over one or several scan directions."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 num_directions: int = 1, depth: int = 1, scan_impl: str = "auto"):
        super().__init__()
        d_inner = expand * dim
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.directions = nn.ModuleList(
            SelectiveSSM(d_inner, d_state, d_conv, dt_rank=math.ceil(dim / 16)) for _ in range(num_directions))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        with torch.no_grad():  # residual branches start small in deep stacks (Mamba/GPT-2 rescaling)
            self.out_proj.weight /= math.sqrt(depth)

    def forward(self, x: torch.Tensor, orders: Sequence[ScanOrder]) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        y = 0
        for ssm, (perm, reverse) in zip(self.directions, orders):
            if perm is None:
                y = y + ssm(x, z, reverse, self.scan_impl)
            else:  # scan a permuted copy (e.g. column order), then put the outputs back in token order
                out = ssm(x[:, perm], z[:, perm], reverse, self.scan_impl)
                y = y + torch.empty_like(out).index_copy_(1, perm, out)
        return self.out_proj(y / len(self.directions))


class MambaMLPBlock(nn.Module):
    """x + DropPath(Mamba(LN(x))), then x + DropPath(SwiGLU(LN(x)))."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1, num_directions: int = 1,
                 depth: int = 1, drop_path: float = 0.0, scan_impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mixer = MambaMixer(dim, d_state, d_conv, expand, num_directions, depth, scan_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = SwiGLU(dim, hidden_features=int(dim * 4 * 2 / 3))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, orders: Sequence[ScanOrder]) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), orders))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def build_blocks(dim: int, depth: int, num_directions: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 drop_path_rate: float = 0.0, scan_impl: str = "auto") -> nn.ModuleList:
    """`depth` blocks with stochastic depth rising linearly from 0 to `drop_path_rate`."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(MambaMLPBlock(dim, d_state, d_conv, expand, num_directions, depth, rate, scan_impl)
                         for rate in rates)


def no_weight_decay_names(model: nn.Module) -> set:
    """Names of the SSM parameters (A_log, D) and learned tokens that take no weight decay."""
    return {name for name, _ in model.named_parameters()
            if name.rsplit(".", 1)[-1] in ("A_log", "D", "cls_token", "separator", "mask_token")}
