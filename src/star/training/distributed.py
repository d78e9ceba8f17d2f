"""Multi-process training: start-up from torchrun or SLURM, model wrapping (DDP or FSDP2), and the
helpers that keep ranks in agreement (rank-0-only printing, exact distributed evaluation, full
checkpoints of sharded models).

One process per GPU. `init_distributed()` reads the launcher's environment

    torchrun:            RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    SLURM (srun, a task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST

and does nothing for a plain single-process run, so one command line runs on 1..N GPUs.
Checkpoints are always written as one full (unsharded) state by rank 0, so they load on any
number of GPUs, with DDP or FSDP.
"""

from __future__ import annotations

import builtins
import datetime
import gc
import os
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
try:
    from torch.distributed.fsdp import FSDPModule, fully_shard  # torch >= 2.6
except ImportError:
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

STRATEGIES = ("ddp", "fsdp")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, number of processes, GPU index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-009,012],cpu1" -> "gpu007"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read a host name from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The process layout the launcher announced; a single process (rank 0 of 1) if there is none.

    torchrun's variables win over SLURM's, so `torchrun` inside a SLURM allocation behaves as usual.
    """
    try:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                           environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", DEFAULT_PORT)))
        if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", 1)) > 1:
            # a port per job, so that two jobs sharing a node do not collide
            port = int(environ.get("MASTER_PORT", 20000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))
            addr = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1")))
            return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                           addr, port)
    except ValueError as err:
        raise ValueError(f"malformed launcher environment (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT or SLURM_*): {err}") from None
    return DistEnv()


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on CPUs) and pin this process
    to its GPU; a no-op for a single process. Other ranks' `print` is silenced (pass `force=True`
    to print anyway), so logs come from rank 0 only."""
    env = read_env()
    if env.world_size == 1 or dist.is_initialized():
        return env
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is outside a world of {env.world_size} processes")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {env.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             "start one process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node)")
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", env.local_rank) if use_cuda else None)
    _print_on_main_only(env.is_main)
    return env


def destroy_distributed() -> None:
    """Leave the process group. Objects kept alive only by reference cycles (the traceback of a caught
    failure holds its FSDP model) are collected first: freed at interpreter exit instead, after the
    group, they aborted the process ("terminate called without an active exception"), 3 exits in 45.
    A traceback still propagating holds its frames; `star.cli.train.run` clears them before calling this."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _print_on_main_only(is_main: bool) -> None:
    builtin_print = builtins.print

    def print(*args, force: bool = False, **kwargs):  # noqa: A001 - replaces the builtin on purpose
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


# ---------------------------------------------------------------------------- models


def wrap_model(model: nn.Module, device: torch.device, strategy: Literal["ddp", "fsdp"] = "ddp") -> nn.Module:
    """The module to train with: DDP (a full replica per GPU, gradients all-reduced), or FSDP2
    (`fully_shard` every block, then the root: parameters, gradients and optimizer state are split
    over the ranks, for models too large to replicate)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for tensor in [*model.parameters(), *model.buffers()]:  # DDP does this itself; sharding needs one init
        dist.broadcast(tensor.data, src=0)
    for name, child in model.named_children():
        if name.endswith("blocks") and isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state_dict(model: nn.Module) -> dict:
    """A sharded model's unsharded weights, on the CPU of rank 0 (empty elsewhere); every rank must call."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: nn.Module, weights: dict) -> None:
    """Shard full weights (read by every rank) into a sharded model."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name, not by position, as for FSDP's full state dicts;
    so one checkpoint loads with or without sharding, on any number of ranks. Every rank must call."""
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names, state = _names_in_optimizer_order(model, optimizer), optimizer.state_dict()
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_by_name`, for a sharded or plain model."""
    if is_sharded(model):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    index = {name: i for i, name in enumerate(_names_in_optimizer_order(model, optimizer))}
    unknown = sorted({n for g in state["param_groups"] for n in g["params"]} - set(index))
    if unknown:
        raise ValueError(f"optimizer state names parameters this model does not train: {unknown[:10]}")
    optimizer.load_state_dict({
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    })


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-item list for a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------- evaluation data


class EvalBatchSampler(Sampler[list[int]]):
    """Batches of an evaluation set split over ranks: every sample exactly once in all, and the same
    number of batches on every rank (sharded models run collectives in every forward, so a rank
    with one batch more would wait forever). Unlike DistributedSampler nothing is padded, so the
    all-reduced counts are exact."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_batches = -(-num_samples // (batch_size * num_replicas))  # per rank
        if num_samples < self.num_batches * num_replicas:
            raise ValueError(f"{num_samples} evaluation samples cannot give each of {num_replicas} ranks "
                             f"{self.num_batches} non-empty batches; use a smaller world or batch size")
        # num_batches * num_replicas batches of near-equal size, dealt round-robin to the ranks
        bounds = torch.linspace(0, num_samples, self.num_batches * num_replicas + 1).round().long().tolist()
        self.batches = [list(range(bounds[i], bounds[i + 1])) for i in range(rank, len(bounds) - 1, num_replicas)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self.batches)
