"""Multi-process training on the CPU (gloo): launcher environments, the distributed STAR sampler,
2 ranks vs 1 process with 2x accumulation, resume across a change of world size, FSDP2, and exact
distributed evaluation. The multi-process runs share one spawn of 2 processes to stay fast."""

import csv
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import star
from star.config import ModelConfig, OptimConfig, TrainConfig
from star.data import StarBatchSampler, build_sequence_loader
from star.build import build_trainer
from star.training import create_loss_fn, evaluate
from star.training.checkpoint import WEIGHTS_NAME, latest_checkpoint
from star.training.distributed import (EvalBatchSampler, destroy_distributed, first_host, init_distributed,
                                       read_env)

GLOBAL_BATCH, K, CRASH_STEP = 16, 2, 5  # images per optimizer step, images per sequence, step a run dies in

# ---------------------------------------------------------------------------- launcher environments


def test_read_env_torchrun_slurm_and_single():
    assert read_env({}).world_size == 1
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "n0", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[007-008,011]"}
    env = read_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 5, "gpu007")
    assert env.master_port == 20000 + 4242 and not env.is_main
    assert read_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).world_size == 2  # torchrun inside SLURM wins
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    assert first_host("cpu1,cpu2") == "cpu1" and first_host("a-b[1-4]") == "a-b1"
    with pytest.raises(ValueError, match="malformed"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------- samplers


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_ranks_get_the_micro_batches_of_one_process():
    """Rank r's i-th batch is batch i*N + r of a single process: the basis of 2 ranks == 2x accumulation."""
    single = _epoch(StarBatchSampler(100, 8, 4, seed=2), 1)
    ranks = [_epoch(StarBatchSampler(100, 8, 4, seed=2, num_replicas=3, rank=r), 1) for r in range(3)]
    assert all(len(r) == len(single) // 3 == 4 for r in ranks)
    for i in range(4):
        assert [ranks[r][i] for r in range(3)] == single[3 * i:3 * i + 3]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 4)])
def test_sampler_resumes_on_another_world_size(old, new):
    """Killed after 1 global batch on `old` ranks, resumed on `new` (same global batch): every sequence
    of the epoch is seen exactly once, in the single-process order."""
    per_step = 16  # images per global batch
    full = [i for b in _epoch(StarBatchSampler(96, per_step, 4, seed=5), 3) for i in b]
    killed = StarBatchSampler(96, per_step // old, 4, seed=5, num_replicas=old, rank=0)
    killed.set_epoch(3)
    state = killed.state_dict(batches_done=1)
    assert state["sequences_done"] == per_step // 4
    seen = full[:per_step]
    resumed = [StarBatchSampler(96, per_step // new, 4, seed=5, num_replicas=new, rank=r) for r in range(new)]
    for sampler in resumed:
        sampler.load_state_dict(state)
        sampler.set_epoch(3)
    assert resumed[0].state_dict()["batches_done"] == 1  # in the new layout's batches
    rest = [list(sampler) for sampler in resumed]
    for i in range(len(rest[0])):  # global batch by global batch
        seen += [j for r in range(new) for j in rest[r][i]]
    assert seen == full


def test_sampler_resume_needs_whole_global_batches():
    state = StarBatchSampler(96, 8, 4, seed=0, num_replicas=2, rank=0).state_dict(batches_done=1)  # 4 sequences
    with pytest.raises(ValueError, match="global batches"):
        StarBatchSampler(96, 12, 4, seed=0).load_state_dict(state)


def test_eval_sampler_exact_and_even():
    for n, batch, world in [(17, 4, 2), (100, 8, 3), (5, 8, 4), (9, 3, 3)]:
        per_rank = [list(EvalBatchSampler(n, batch, world, r)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # equal batch counts: no rank waits in a collective
        flat = sorted(i for batches in per_rank for b in batches for i in b)
        assert flat == list(range(n))  # each sample once, nothing padded
        assert all(0 < len(b) <= batch for batches in per_rank for b in batches)
    with pytest.raises(ValueError, match="non-empty"):
        EvalBatchSampler(3, 8, 4, 0)


# ---------------------------------------------------------------------------- training on 2 processes


def tiny_model():
    torch.manual_seed(0)
    return star.create_model("star_pretrain_tiny_patch16_192", img_size=16, patch_size=4, in_chans=1, cluster_size=2,
                             embed_dim=32, depth=2, decoder_dim=32, decoder_num_heads=4, num_images=K,
                             scan_impl="chunked")


def make_cfg(out, world, **top):
    accum = 2 // world
    optim = OptimConfig(epochs=2, warmup_epochs=0.5, batch_size=GLOBAL_BATCH // (world * accum), accum_iter=accum,
                        blr=1e-2, clip_grad=1.0)
    return TrainConfig(task="pretrain", model=ModelConfig(), optim=optim, output_dir=str(out), device="cpu", amp="none",
                       log_every=1, save_every=2, keep_last=0, **top)


def dataset():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g))


class DiesAtStep:
    """The pretraining loss, until optimizer step `step` starts: then the run dies (as if killed)."""

    def __init__(self, cfg, step):
        self.loss_fn, self.calls_left = create_loss_fn(cfg), (step - 1) * cfg.optim.accum_iter

    def __call__(self, model, batch):
        if self.calls_left == 0:
            raise RuntimeError("killed")
        self.calls_left -= 1
        return self.loss_fn(model, batch)


def train(out, world, die_at=None, resume=None, **top):
    cfg = make_cfg(out, world, resume=resume, **top)
    loss_fn = DiesAtStep(cfg, die_at) if die_at else create_loss_fn(cfg)
    loader = build_sequence_loader(dataset(), cfg.optim.batch_size, K, seed=cfg.seed)
    trainer = build_trainer(cfg, tiny_model(), loss_fn, loader)
    if die_at is None:
        trainer.fit()
        return
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit()


def losses(out):
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def final_weights(out):
    return load_file(str(latest_checkpoint(out) / WEIGHTS_NAME))


def eval_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))


def eval_loader(batch_sampler):
    return DataLoader(TensorDataset(*[t[:17] for t in dataset().tensors]), batch_sampler=batch_sampler)


def _worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, dist.get_backend()) == (rank, world, "gloo")
    train(root / "ddp", world)
    train(root / "ddp_killed", world, die_at=CRASH_STEP)
    train(root / "single_killed", world, resume="auto")  # a 1-process run's checkpoint, resumed on 2 ranks
    train(root / "fsdp", world, distributed="fsdp")
    train(root / "fsdp_killed", world, die_at=CRASH_STEP, distributed="fsdp")
    evaluation = evaluate(eval_model(), eval_loader(EvalBatchSampler(17, 4)))  # 9 + 8 samples, counts summed
    if rank == 0:
        torch.save(evaluation, root / "eval.pt")
    destroy_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    train(root / "single", 1)  # the reference: 1 process, 2x gradient accumulation
    train(root / "single_killed", 1, die_at=CRASH_STEP)
    mp.spawn(_worker, args=(2, _free_port(), root), nprocs=2, join=True)
    train(root / "ddp_killed", 1, resume="auto")  # a 2-rank run's checkpoint, resumed on 1 process
    train(root / "fsdp_killed", 1, resume="auto")
    return root


def _assert_same_run(out, reference, rtol=1e-4, atol=1e-4):
    """Same losses and final weights. atol: the attention key bias has an exactly-zero gradient, so
    AdamW turns rounding noise into steps of up to ~lr/20; every other weight agrees to ~1e-6."""
    got, want = losses(out), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol), f"loss of step {step}"
    got, want = final_weights(out), final_weights(reference)
    assert latest_checkpoint(out).name == latest_checkpoint(reference).name == "step-00000006"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def test_two_ranks_equal_one_process_with_accumulation(runs):
    _assert_same_run(runs / "ddp", runs / "single")
    assert losses(runs / "single")[6] < losses(runs / "single")[1]  # it learns: the comparison is not vacuous


def test_fsdp_equals_one_process(runs):
    _assert_same_run(runs / "fsdp", runs / "single")


@pytest.mark.parametrize("run", ["ddp_killed", "single_killed", "fsdp_killed"])
def test_resume_after_kill_on_another_world_size(runs, run):
    """Killed in step 5 (mid-epoch, after the step-4 checkpoint) and resumed on the other world size."""
    assert (runs / run / "checkpoints" / "step-00000004").is_dir()
    _assert_same_run(runs / run, runs / "single")


def test_distributed_evaluation_counts_exactly(runs):
    single = evaluate(eval_model(), eval_loader(EvalBatchSampler(17, 4, num_replicas=1, rank=0)))
    assert torch.load(runs / "eval.pt") == pytest.approx(single)
