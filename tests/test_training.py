"""Training engine, optimizer groups, lr schedule and checkpoints, on tiny stand-in models (CPU)."""

import csv
import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from star.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from star.data import StarBatchSampler, build_sequence_loader
from star.build import build_trainer
from star.training import (CosineSchedule, atomic_write, cosine_lr, create_loss_fn, create_optimizer,
                           evaluate, freeze_for_linear_probe, latest_checkpoint, load_checkpoint, load_weights,
                           param_groups, resolve_lr, save_checkpoint)
from star.training import checkpoint as checkpoint_module

# ---------------------------------------------------------------------------- stand-in models


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc, self.drop = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Dropout(0.2)
        self.A_log = nn.Parameter(torch.zeros(dim, 2))  # 2-D, excluded from weight decay only by name

    def forward(self, x):
        return x + self.drop(torch.tanh(self.fc(self.norm(x)))) * self.A_log.exp().mean(1)


class TinyClassifier(nn.Module):
    """Follows the classifier interface: no_weight_decay(), group_matcher(), blocks, head."""

    def __init__(self, in_dim=12, dim=16, depth=3, num_classes=4):
        super().__init__()
        self.patch_embed = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.fc_norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(("A_log", "cls_token"))}

    def group_matcher(self, coarse=False):
        return dict(stem=r"^cls_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^fc_norm", (99999,))])

    def forward(self, images):
        x = self.patch_embed(images.flatten(1)) + self.cls_token
        for block in self.blocks:
            x = block(x)
        return self.head(self.fc_norm(x))


class TinyPretrain(nn.Module):
    """Follows the pretraining interface: images (B, K, C, H, W) -> dict with a scalar "loss"."""

    def __init__(self, in_dim=12, dim=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(0.2), nn.Linear(dim, in_dim))

    def no_weight_decay(self):
        return set()

    def forward(self, images):
        x = images.flatten(2)
        pred, target = self.encoder(x[:, :-1]), x[:, 1:]  # predict the next image of the sequence
        return {"loss": ((pred - target) ** 2).mean(), "pred": pred, "target": target}


def make_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 4, (n,), generator=g))


def make_cfg(tmp_path, task, **top):
    optim = OptimConfig(epochs=3, warmup_epochs=1, batch_size=8, accum_iter=2, blr=0.05, min_lr=1e-3,
                        weight_decay=0.05, clip_grad=1.0, layer_decay=0.8 if task == "finetune" else None,
                        smoothing=0.1, ema_decay=0.9 if task == "finetune" else None)
    data = DataConfig(mixup=0.8 if task == "finetune" else 0.0, cutmix=1.0 if task == "finetune" else 0.0)
    return TrainConfig(task=task, model=ModelConfig(num_classes=4), data=data, optim=optim,
                       output_dir=str(tmp_path), device="cpu", amp="none", log_every=1, **top)


def make_job(cfg, seed=0):
    """Model, loss and loaders for a stand-in job; shuffled by the data package's resumable sampler."""
    torch.manual_seed(seed)
    dataset = make_data()
    if cfg.task == "pretrain":
        model = TinyPretrain()
        train = build_sequence_loader(dataset, cfg.optim.batch_size, images_per_seq=2, seed=cfg.seed)
        return model, create_loss_fn(cfg), train, None
    model = TinyClassifier()
    train = DataLoader(dataset, batch_sampler=StarBatchSampler(len(dataset), cfg.optim.batch_size, 1, seed=cfg.seed))
    val = DataLoader(make_data(16, seed=1), batch_size=8)
    return model, create_loss_fn(cfg), train, val


def read_losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# ---------------------------------------------------------------------------- schedule and optimizer


def test_lr_scaling_rule_and_schedule_shape():
    optim = OptimConfig(blr=1.5e-4, batch_size=256, accum_iter=2)
    assert resolve_lr(optim, world_size=4) == pytest.approx(1.5e-4 * 256 * 2 * 4 / 256)
    assert resolve_lr(dataclasses.replace(optim, lr=0.3), world_size=4) == 0.3
    lr, min_lr, warm, total = 1.0, 0.01, 10, 110
    assert cosine_lr(0, lr, min_lr, warm, total) == 0.0
    assert cosine_lr(5, lr, min_lr, warm, total) == pytest.approx(0.5)
    assert cosine_lr(warm, lr, min_lr, warm, total) == pytest.approx(lr)
    assert cosine_lr(60, lr, min_lr, warm, total) == pytest.approx((lr + min_lr) / 2)  # cosine midpoint
    assert cosine_lr(total, lr, min_lr, warm, total) == pytest.approx(min_lr)
    assert cosine_lr(total + 5, lr, min_lr, warm, total) == pytest.approx(min_lr)
    values = [cosine_lr(s, lr, min_lr, warm, total) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_param_groups_weight_decay_and_layer_decay():
    model = TinyClassifier()
    names = {id(p): n for n, p in model.named_parameters()}
    for layer_decay in (None, 0.5):
        groups = param_groups(model, weight_decay=0.05, layer_decay=layer_decay)
        decay_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
        assert set(decay_of) == set(names.values())  # every parameter exactly once
        for name, p in model.named_parameters():
            no_decay = p.ndim <= 1 or name.endswith(("A_log", "cls_token"))
            assert decay_of[name] == (0.0 if no_decay else 0.05), name
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    depth_order = ["patch_embed.weight", "blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight", "head.weight"]
    scales = [scale_of[n] for n in depth_order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] == 1.0
    assert scales[-2] == pytest.approx(0.5)  # one layer below the top

    opt = create_optimizer(model, OptimConfig(layer_decay=0.5), lr=1.0)
    CosineSchedule(opt, lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10).step(0)
    assert sorted({g["lr"] for g in opt.param_groups}) == sorted({2.0 * g["lr_scale"] for g in opt.param_groups})
    assert opt.defaults["fused"] is None  # fused AdamW only for CUDA parameters


def test_linear_probe_trains_only_the_head():
    model = TinyClassifier()
    assert freeze_for_linear_probe(model) == ["head.weight", "head.bias"]
    opt = create_optimizer(model, OptimConfig(), lr=1.0)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.head.parameters())
    with pytest.raises(ValueError, match="head"):
        freeze_for_linear_probe(TinyPretrain())


# ---------------------------------------------------------------------------- checkpoints


def test_atomic_write_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    atomic_write(path, lambda p: p.write_text("old"))

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_checkpoint_crash_keeps_previous_and_pruning(tmp_path, monkeypatch):
    model = TinyClassifier()
    first = save_checkpoint(tmp_path, 1, model, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", first.name]  # no partial dir
    assert all(torch.equal(before[k], v) for k, v in load_weights(tmp_path).items())

    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]
    assert load_checkpoint(tmp_path, TinyClassifier())["step"] == 4


def test_load_checkpoint_names_mismatched_keys(tmp_path):
    save_checkpoint(tmp_path, 1, TinyClassifier(depth=2, num_classes=4), {})
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path, TinyClassifier(depth=3, num_classes=5))
    msg = str(err.value)
    assert "missing keys: blocks.2." in msg and "blocks.2.fc.weight" in msg
    assert "head.weight: checkpoint (4, 16) vs model (5, 16)" in msg


# ---------------------------------------------------------------------------- engine


@pytest.mark.parametrize("save_every, checkpoint", [(2, "step-00000004"), (0, "step-00000003")],
                         ids=["mid-epoch", "epoch-end"])
@pytest.mark.parametrize("task", ["finetune", "pretrain"])
def test_resume_retraces_the_uninterrupted_run(tmp_path, task, save_every, checkpoint):
    # 48 images / batch 8 = 6 batches per epoch, accum 2 -> 3 optimizer steps per epoch, 9 in all
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    cfg = make_cfg(full_dir, task)
    build_trainer(cfg, *make_job(cfg)).fit()
    full = read_losses(full_dir)
    assert sorted(full) == list(range(1, 10))

    cfg = make_cfg(crash_dir, task, save_every=save_every)
    model, loss_fn, train, val = make_job(cfg)
    calls = 0

    def crashing_loss(model, batch):  # dies in the middle of optimizer step 6 (epoch 1)
        nonlocal calls
        calls += 1
        if calls == 11:
            raise KeyboardInterrupt
        return loss_fn(model, batch)

    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, model, crashing_loss, train, val).fit()
    # mid-epoch: 2 of 6 batches into epoch 1; epoch-end: the end of epoch 0, before the next epoch's loader
    assert latest_checkpoint(crash_dir).name == checkpoint
    with pytest.raises(ValueError, match="resume auto"):
        build_trainer(cfg, *make_job(cfg))

    cfg = dataclasses.replace(cfg, resume="auto")
    build_trainer(cfg, *make_job(cfg, seed=123)).fit()  # different init: everything must come from the checkpoint
    resumed = read_losses(crash_dir)
    assert sorted(resumed) == sorted(full)
    starts = json.loads((crash_dir / "environment.json").read_text())  # the first start, then the resume
    assert [s["from_step"] for s in starts] == [0, int(checkpoint[5:])] and starts[1]["torch"] == torch.__version__
    for step in full:
        assert abs(full[step] - resumed[step]) <= 1e-6, (step, full[step], resumed[step])
    a, b = load_checkpoint(full_dir, make_job(cfg)[0]), load_checkpoint(crash_dir, make_job(cfg)[0])
    assert load_weights(full_dir).keys() == load_weights(crash_dir).keys()
    for k, v in load_weights(full_dir).items():
        torch.testing.assert_close(v, load_weights(crash_dir)[k], rtol=0, atol=1e-6)
    if task == "finetune":
        for k, v in a["ema"].items():
            torch.testing.assert_close(v, b["ema"][k], rtol=0, atol=1e-6)


class PerEpochSampler:
    """A StarBatchSampler without `span_epochs`: the trainer makes a new loader iterator at every epoch."""

    def __init__(self, sampler):
        self.sampler = sampler
        for name in ("set_epoch", "state_dict", "load_state_dict", "__len__", "__iter__"):
            setattr(self, name, getattr(sampler, name))

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return iter(self.sampler)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_iterator_spans_the_epochs_and_trains_on_what_per_epoch_iterators_give(tmp_path, monkeypatch,
                                                                                          workers):
    """7 batches per epoch, accum 2: each epoch trains on its first 6 batches, with one iterator for the run."""
    starts, passes = [], StarBatchSampler.__iter__

    def counted_passes(self):  # a generator: counts the passes that yield, not iter() calls (workers make two)
        starts.append(self.epoch)
        yield from passes(self)

    monkeypatch.setattr(StarBatchSampler, "__iter__", counted_passes)
    def job(cfg, wrap=lambda sampler: sampler):
        model, loss_fn, train, _ = make_job(cfg)
        data = make_data(56)
        train = DataLoader(data, batch_sampler=wrap(StarBatchSampler(len(data), 8, 2, seed=cfg.seed)),
                           num_workers=workers, persistent_workers=workers > 0, collate_fn=train.collate_fn,
                           generator=torch.Generator())  # iter() would draw from the RNG the dropout uses
        return model, loss_fn, train

    losses = {}
    for name, wrap in [("spanning", lambda s: s), ("per-epoch", PerEpochSampler)]:
        cfg = make_cfg(tmp_path / name, "pretrain")
        starts.clear()
        build_trainer(cfg, *job(cfg, wrap)).fit()
        assert starts == ([0] if name == "spanning" else [0, 1, 2])
        losses[name] = read_losses(tmp_path / name)
    assert sorted(losses["spanning"]) == list(range(1, 10)) and losses["spanning"] == losses["per-epoch"]

    # stopped mid-epoch 1, when the workers have loaded into epoch 2, then resumed; and a fit() with a raised
    # max_steps on the same trainer: its iterator was sized for the first fit's steps
    cfg = make_cfg(tmp_path / "resumed", "pretrain", max_steps=4)
    build_trainer(cfg, *job(cfg)).fit()
    trainer = build_trainer(dataclasses.replace(cfg, resume="auto", max_steps=5), *job(cfg))
    trainer.fit()
    trainer.cfg = dataclasses.replace(trainer.cfg, max_steps=None)
    trainer.fit()
    assert read_losses(tmp_path / "resumed") == losses["spanning"]
    assert len(list(trainer.train_loader)) == 7  # after fit(), iterating the loader gives one epoch again


def test_resume_auto_on_a_new_run_says_it_starts_from_scratch(tmp_path, capsys):
    cfg = dataclasses.replace(make_cfg(tmp_path / "new", "finetune"), resume="auto")
    trainer = build_trainer(cfg, *make_job(cfg))
    assert trainer.step == 0
    assert f"--resume auto: no checkpoint in {tmp_path / 'new' / 'checkpoints'}, starting from step 0" in \
        capsys.readouterr().out


def test_resume_checks_the_batch_and_task_and_takes_the_new_hyperparameters(tmp_path, capsys):
    cfg = dataclasses.replace(make_cfg(tmp_path, "finetune"), max_steps=2, save_every=1)
    build_trainer(cfg, *make_job(cfg)).fit()
    resume = dataclasses.replace(cfg, resume="auto", max_steps=3)
    bigger = dataclasses.replace(resume, optim=dataclasses.replace(cfg.optim, batch_size=16))
    with pytest.raises(ValueError, match="global batch of 16 images .* this run's is 32"):
        build_trainer(bigger, *make_job(bigger))
    split = dataclasses.replace(resume, optim=dataclasses.replace(cfg.optim, batch_size=4, accum_iter=4))
    build_trainer(split, *make_job(split))  # the same global batch, split differently: fine
    other_task = dataclasses.replace(resume, task="linprobe")
    with pytest.raises(ValueError, match="finetune checkpoint; it cannot resume a linprobe run"):
        build_trainer(other_task, *make_job(other_task))
    assert build_trainer(dataclasses.replace(resume, max_steps=2), *make_job(cfg)).fit() == {}  # already there: says so
    assert "nothing to train: the run is at step 2" in capsys.readouterr().out
    changed = dataclasses.replace(resume, optim=dataclasses.replace(cfg.optim, weight_decay=0.3, betas=(0.5, 0.6),
                                                                    layer_decay=0.5))
    trainer = build_trainer(changed, *make_job(changed))
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3} and {g["betas"] for g in groups} == {(0.5, 0.6)}
    assert sorted({g["lr_scale"] for g in groups})[-2] == pytest.approx(0.5)  # layer decay 0.5, not the saved 0.8


@pytest.mark.parametrize("save_every, saved", [(0, [3, 6, 9]), (4, [3, 4, 6, 8, 9]), (-1, [9]), (5, [3, 5, 6, 9])])
def test_checkpoint_schedule(tmp_path, save_every, saved):
    """3 optimizer steps per epoch, 3 epochs: epoch ends unless save_every is -1 (only the last), plus every
    save_every steps."""
    cfg = make_cfg(tmp_path, "finetune", save_every=save_every, keep_last=0)
    build_trainer(cfg, *make_job(cfg)).fit()
    assert sorted(int(p.name.removeprefix("step-")) for p in (tmp_path / "checkpoints").glob("step-*")) == saved


@pytest.mark.parametrize("override, flag", [(dict(log_every=0), "--log_every must be >= 1"),
                                            (dict(save_every=-2), "--save_every must be >= -1"),
                                            (dict(eval_every=-1), "--eval_every must be >= 0"),
                                            (dict(max_steps=0), "--max_steps must be >= 1")])
def test_bad_intervals_name_the_flag(tmp_path, override, flag):
    cfg = dataclasses.replace(make_cfg(tmp_path, "finetune"), **override)
    with pytest.raises(ValueError, match=flag):
        build_trainer(cfg, *make_job(cfg))


def test_non_finite_loss_stops_naming_the_step_and_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "finetune", save_every=2)
    model, loss_fn, train, val = make_job(cfg)
    calls = 0

    def exploding_loss(model, batch):  # NaN in optimizer step 5 (micro-batches 9 and 10)
        nonlocal calls
        calls += 1
        loss, logs = loss_fn(model, batch)
        return (loss * math.nan if calls == 9 else loss), logs

    trainer = build_trainer(cfg, model, exploding_loss, train, val)
    with pytest.raises(FloatingPointError, match=r"optimizer step 5 \(epoch 1.*step-00000004"):
        trainer.fit()
    assert trainer.step == 4


def test_evaluate_top1_top5():
    model = TinyClassifier(num_classes=6).eval()  # no dropout, so logits here match evaluate's
    data = make_data(20)
    with torch.no_grad():
        logits = model(data.tensors[0])
    labels = logits.argsort(dim=1, descending=True)[:, torch.arange(20) % 6]  # rank i%6 is the label
    loader = DataLoader(TensorDataset(data.tensors[0], labels.diagonal()), batch_size=7)
    results = evaluate(model.train(), loader)
    assert model.training  # evaluate restores the mode it found
    rank = torch.arange(20) % 6
    assert results["top1"] == pytest.approx(100 * (rank == 0).float().mean().item())
    assert results["top5"] == pytest.approx(100 * (rank < 5).float().mean().item())
    assert results["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels.diagonal()).item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-tests.sh runs it)")
def test_fused_adamw_on_cuda_matches_foreach():
    torch.manual_seed(0)
    fused_model, plain_model = TinyClassifier().cuda().eval(), TinyClassifier().cuda().eval()  # no dropout
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = OptimConfig(layer_decay=0.5)
    fused = create_optimizer(fused_model, cfg, lr=1e-2)
    plain = torch.optim.AdamW(param_groups(plain_model, cfg.weight_decay, cfg.layer_decay), lr=1e-2,
                              betas=cfg.betas, foreach=True)
    assert fused.defaults["fused"] is True
    x = torch.randn(4, 12, device="cuda")
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
