"""Grouped parameters: one parameter set per run of sequences in the batch.

A scan or conv parameter may carry a leading groups dim (A: (groups, d, d_state); D, dt bias: (groups, d);
conv weight: (groups, d, k)). The batch then holds `groups` equal runs of sequences, and run g uses set g:
how the 4-direction mixer runs all its directions in one call. An input may also be shared by the runs (one
run of sequences that every group reads, e.g. the gate z of all four directions): the kernels read it in place,
the PyTorch forms repeat it (`repeat_runs`). Shared by the PyTorch ops and the kernels.
"""
import torch


def param_groups(param: torch.Tensor, plain_dims: int, batch: int, noun: str) -> int:
    """How many parameter groups `param` holds: 1 when it has its plain number of dims, else its first dim.
    A ValueError unless the groups split the batch into equal runs of sequences."""
    if param.dim() == plain_dims:
        return 1
    groups = param.shape[0]
    if groups < 1 or batch % groups:
        raise ValueError(f"batch={batch} must be a multiple of the {groups} {noun} "
                         f"(the batch holds one run of sequences per group)")
    return groups


def sequences_per_group(x: torch.Tensor, param: torch.Tensor) -> int:
    """Sequences of x's batch per parameter group (a grouped A or conv weight has 3 dims, the group first);
    the whole batch when ungrouped. Kernels find a sequence's group as its batch index // this."""
    return x.shape[0] // param.shape[0] if param.dim() == 3 else x.shape[0]


def sum_per_group(part: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum per-sequence gradient partials (ordered by batch index first) over each group's run."""
    return part.view(groups, -1, *part.shape[1:]).sum(1)


# a mixer direction's parameters, in the order `stack_directions` takes and returns them: conv1d weight (d, 1, k)
# and bias, x_proj and dt_proj weights, A_log, D, dt_proj bias
DIRECTION_PARAMS = 7


def stack_directions(params):
    """The mixer directions' parameters (DIRECTION_PARAMS each, flat, direction by direction) as grouped parameters,
    (directions, ...) each, in DIRECTION_PARAMS' order; the conv weight as the ops' (d, k); None stays None."""
    num = len(params) // DIRECTION_PARAMS
    stacked = []
    for i in range(DIRECTION_PARAMS):
        group = params[i::DIRECTION_PARAMS]
        if group[0] is None:
            stacked.append(None)
            continue
        if i == 0:  # nn.Conv1d's depthwise (d, 1, k) weight as the ops' (d, k)
            group = [w[:, 0] for w in group]
        stacked.append(group[0].unsqueeze(0) if num == 1 else torch.stack(group))
    return stacked


def repeat_runs(x: torch.Tensor, batch: int) -> torch.Tensor:
    """A shared input repeated into one run per group, `batch` sequences in all (x itself if it has them)."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))
