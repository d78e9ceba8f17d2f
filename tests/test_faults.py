"""Nothing lost under faults: kills (SIGKILL at random moments and inside checkpoint writes), corrupt files,
a full disk, two writers on one run, divergence and hostile images, on tiny synthetic runs of the `star` CLI.

Each kill trial starts real training processes (forked from a server process, to skip the interpreter's
start-up), SIGKILLs one at a random moment (random mode) or two in a row inside checkpoint writes
(inside-write mode, via STAR_FAULT_INJECT), resumes to the end and compares the losses and final weights with
an uninterrupted run. By default one trial runs per case; `STAR_FAULT_KILLS=20` runs trials until 20 kills per case
have landed (about 30 minutes on 2 cores; marked slow), `STAR_FAULT_SEED` picks other kill moments.
"""

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from star.cli.main import main
from star.build import build_trainer
from star.training import checkpoint, engine
from star.training.checkpoint import (FAULT_POINTS, CheckpointError, clean_interrupted_saves, latest_checkpoint,
                                      lock_run_dir, read_checkpoint, save_checkpoint, step_checkpoints)
from star.training.metrics import MetricsLogger
from test_cli import SYNTHETIC, TINY, star
from test_training import TinyClassifier, make_cfg, make_job, read_losses

PRE = ["pretrain", *TINY, "--model.cluster_size", "2", "--model.decoder_dim", "32", "--model.decoder_num_heads", "4"]
FINE = ["finetune", *TINY, "--data.val_size", "16", "--model.num_classes", "10", "--pretrained", "none"]
# Pretraining: 64 images / 16 = 4 steps per epoch, cut at 6; fine-tuning: 48 / 16 = 3, cut at 4. Random crops
# and flips make every sample depend on the RNG. save_every 2 and keep_last 1: a single checkpoint on disk, and
# the last step, mid-epoch, is a multiple of save_every: the case whose final checkpoint a kill could lose.
SAVES = ["--optim.epochs", 2, "--save_every", 2, "--keep_last", 1]
JOBS = {"pretrain": [*PRE, *SYNTHETIC, *SAVES, "--max_steps", 6], "finetune": [*FINE, *SYNTHETIC, *SAVES, "--max_steps", 4]}


def messages(err: str) -> list:
    """What a command printed to stderr, less its progress bars (tqdm redraws them after carriage returns)."""
    return [line for line in err.split("\n") if line and "\r" not in line]


def losses(run) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_run(run, reference) -> None:
    """Bit-identical losses at every step and final weights."""
    assert losses(run) == losses(reference)
    weights, expected = load_file(str(run / "model" / "model.safetensors")), load_file(
        str(reference / "model" / "model.safetensors"))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each (task, workers), made once."""
    runs = {}

    def run(task, workers):
        if (task, workers) not in runs:
            out = tmp_path_factory.mktemp(f"{task}-{workers}") / "run"
            assert star(*JOBS[task], "--data.num_workers", workers, "--output_dir", out) == 0
            runs[task, workers] = out
        return runs[task, workers]

    return run


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("task, stops", [("pretrain", (2, 4)), ("finetune", (2, 3))])
def test_resume_with_workers_retraces_the_uninterrupted_run(tmp_path, uninterrupted, task, stops, workers):
    """Stopped mid-epoch and at an epoch's end, then resumed: the same run as one that never stopped, also
    with data-loader workers (whose augmentation randomness used to restart from a new seed on resume)."""
    job = [*JOBS[task], "--data.num_workers", workers]
    for stop in stops:
        assert star(*job, "--output_dir", tmp_path, "--resume", "auto", "--max_steps", stop) == 0
    assert star(*job, "--output_dir", tmp_path, "--resume", "auto") == 0
    assert_same_run(tmp_path, uninterrupted(task, workers))


# ---------------------------------------------------------------------------- checkpoints, in process
# (make_cfg's stand-in job: 3 optimizer steps per epoch, 9 in all)


def saved_steps(run) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in reversed(step_checkpoints(run))]


def test_the_last_step_is_saved_once(tmp_path, monkeypatch):
    """max_steps a multiple of save_every, mid-epoch: the loop's save and the final one were the same step, and
    the second deleted the first before renaming its own copy into place."""
    saves = []
    monkeypatch.setattr(engine, "save_checkpoint", lambda run, step, *a: saves.append(step) or save_checkpoint(run, step, *a))
    cfg = make_cfg(tmp_path, "finetune", save_every=2, max_steps=4, keep_last=1)
    build_trainer(cfg, *make_job(cfg)).fit()
    assert saves == [2, 3, 4] and saved_steps(tmp_path) == [4]


def test_a_step_saved_again_keeps_its_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    model = TinyClassifier()
    first = save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=1)
    replace, calls = checkpoint.os.replace, []

    def dies_renaming_the_new_copy(src, dst):  # the second rename of the re-save: as if killed before it
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_renaming_the_new_copy)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, model, {"step": 1, "again": True}, keep_last=1)
    monkeypatch.undo()
    assert not first.exists() and latest_checkpoint(tmp_path) == first  # the moment a kill would leave
    clean_interrupted_saves(tmp_path)
    assert read_checkpoint(first)[1] == {"step": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", first.name]


def test_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model = TinyClassifier()
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, **kw: (path / checkpoint.STATE_NAME).unlink())
    save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=1)  # "deletes" step 1 halfway
    monkeypatch.undo()
    assert saved_steps(tmp_path) == [2]  # the half-deleted dir is a temp dir, not a checkpoint a resume would try
    assert [p.name for p in clean_interrupted_saves(tmp_path)] == [".step-00000001.pruned.tmp"]


def test_second_writer_is_refused_naming_the_dir(tmp_path, capsys):
    run = tmp_path / "run"
    lock = lock_run_dir(run)  # as a live run holds it
    try:
        for resume in ([], ["--resume", "auto"]):
            assert star(*JOBS["pretrain"], "--output_dir", run, *resume) == 2
            err = capsys.readouterr().err
            assert len(messages(err)) == 1 and f"{run} is in use by another star run (pid " in err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        lock.close()
    assert star(*JOBS["pretrain"], "--output_dir", run, "--max_steps", 1) == 0  # free once the holder is gone


def _wait_forever(started) -> None:
    started.set()
    time.sleep(300)


def test_the_lock_ends_with_its_process_not_with_forked_workers(tmp_path):
    """Data-loader workers are forked from the run: the lock file they inherit is closed in them, so a killed
    run's directory is free at once, not after its orphaned workers notice and exit."""
    lock, fork = lock_run_dir(tmp_path), multiprocessing.get_context("fork")
    started = fork.Event()
    worker = fork.Process(target=_wait_forever, args=(started,))
    worker.start()
    try:
        assert started.wait(60)
        lock.close()  # the run ends (or dies); its worker lives on
        lock_run_dir(tmp_path).close()
    finally:
        worker.kill()
        worker.join()


def test_missing_latest_resumes_from_the_newest_step_dir_never_restarts(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "finetune", save_every=2, max_steps=5)
    build_trainer(cfg, *make_job(cfg)).fit()
    rows = (tmp_path / "metrics.csv").read_text()
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match="already holds checkpoints .*step-00000005.*--resume auto"):
        build_trainer(cfg, *make_job(cfg))
    assert (tmp_path / "metrics.csv").read_text() == rows and saved_steps(tmp_path) == [3, 4, 5]
    capsys.readouterr()
    trainer = build_trainer(dataclasses.replace(cfg, resume="auto", max_steps=6), *make_job(cfg))
    assert trainer.step == 5 and "latest is missing; resuming from " in capsys.readouterr().err
    trainer.fit()
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys, victim, damage):
    cfg = make_cfg(tmp_path, "finetune", save_every=2, max_steps=4)
    build_trainer(cfg, *make_job(cfg)).fit()
    bad = latest_checkpoint(tmp_path) / victim
    {"truncated": lambda: bad.write_bytes(bad.read_bytes()[:100]), "garbage": lambda: bad.write_bytes(b"x" * 999),
     "missing": bad.unlink}[damage]()
    capsys.readouterr()
    trainer = build_trainer(dataclasses.replace(cfg, resume="auto"), *make_job(cfg))
    err = capsys.readouterr().err
    assert trainer.step == 3 and str(bad) in err and "resuming from" in err and "weights_only" not in err
    trainer.close()
    with pytest.raises((CheckpointError, FileNotFoundError), match=str(bad.parent)):  # asked for by name: no fallback
        build_trainer(dataclasses.replace(cfg, resume=str(bad.parent)), *make_job(cfg))


def test_no_readable_checkpoint_is_a_one_line_error_naming_the_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert star(*JOBS["pretrain"], "--output_dir", run, "--max_steps", 1) == 0
    (latest_checkpoint(run) / "state.pt").write_bytes(b"\0" * 64)
    capsys.readouterr()
    assert star(*JOBS["pretrain"], "--output_dir", run, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and f"no readable checkpoint in {run / 'checkpoints'}" in err
    assert str(latest_checkpoint(run) / "state.pt") in err and "weights_only" not in err


def test_metrics_csv_survives_a_kill_while_it_is_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": step / 10})
    logger.close()
    whole = path.read_text()
    monkeypatch.setattr(csv.DictWriter, "writerows", lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, resume_step=2)  # dies rewriting the file
    monkeypatch.undo()
    assert path.read_text() == whole and list(tmp_path.glob(".*.tmp")) == []
    path.write_text(whole + "4,0.")  # a row cut short by a kill is dropped on resume, not misread
    MetricsLogger(tmp_path, resume_step=9).close()
    assert path.read_text() == whole


def nan_gradient_at(call: int, loss_fn):
    """`loss_fn`, except that at its `call`-th call the loss stays finite and its gradient is NaN."""
    calls = 0

    def loss(model, batch):
        nonlocal calls
        calls += 1
        value, logs = loss_fn(model, batch)
        if calls == call:
            w = model.head.weight
            value = value + torch.where(w > -math.inf, torch.zeros_like(w), torch.sqrt(-w.abs() - 1)).sum()
        return value, logs

    return loss


def test_a_diverged_last_update_is_never_saved(tmp_path, monkeypatch):
    """The loss is checked before each update; the last update's result only at saving."""
    cfg = make_cfg(tmp_path, "finetune", save_every=2, max_steps=4)
    model, loss_fn, train, val = make_job(cfg)
    trainer = build_trainer(cfg, model, nan_gradient_at(8, loss_fn), train, val)  # micro-batch 8: step 4, the last
    with pytest.raises(FloatingPointError, match=r"by optimizer step 4: parameter \S+ reaches \|w\| = nan.*"
                                                 r"not saved. Last good checkpoint: .*step-00000003"):
        trainer.fit()
    assert saved_steps(tmp_path) == [2, 3]
    monkeypatch.setattr(engine, "MAX_WEIGHT", 0.05)  # finite, but beyond the bound: diverged too
    cfg = make_cfg(tmp_path / "big", "finetune", max_steps=1)
    with pytest.raises(FloatingPointError, match=r"reaches \|w\| = .* beyond 5e-02"):
        build_trainer(cfg, *make_job(cfg)).fit()
    assert not (tmp_path / "big" / "checkpoints").exists()


def test_full_disk_is_a_one_line_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """torch's own message for a full disk ("[enforce fail at inline_container.cc:672] . unexpected pos") is
    replaced by one naming the file; the previous checkpoint stays, and no temp dir is left."""
    run = tmp_path / "run"
    assert star(*JOBS["pretrain"], "--output_dir", run, "--max_steps", 1) == 0
    save = torch.save

    def disk_full(obj, path):
        save(obj, path)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    capsys.readouterr()
    assert star(*JOBS["pretrain"], "--output_dir", run, "--resume", "auto", "--max_steps", 2) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar's line, one line of error, no traceback
    assert "Traceback" not in err
    assert last.startswith(f"star pretrain: error: cannot write checkpoint file {run}/checkpoints/step-00000002/state.pt")
    assert last.endswith(f"the previous checkpoint {run}/checkpoints/step-00000001 is intact")
    assert saved_steps(run) == [1] and read_checkpoint(latest_checkpoint(run))[1]["step"] == 1
    assert list((run / "checkpoints").glob(".*")) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for one checkpoint of the tiny model (1.3 MB), not for its successor beside it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full-disk test covers the message")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(small_disk, capsys):
    run = small_disk / "run"
    assert star(*JOBS["pretrain"], "--output_dir", run, "--save_every", 1, "--keep_last", 1, "--max_steps", 3) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar's line, one line of error, no traceback
    assert "Traceback" not in err and f"cannot write checkpoint file {run}/checkpoints/step-00000002/" in last
    assert "No space left on device" in err or "the write failed" in err
    assert saved_steps(run) == [1] and read_checkpoint(latest_checkpoint(run))[1]["step"] == 1


def test_leftovers_of_killed_saves_are_removed_and_a_refused_resume_writes_nothing(tmp_path):
    cfg = make_cfg(tmp_path, "finetune", save_every=2, max_steps=2)
    build_trainer(cfg, *make_job(cfg)).fit()
    leftovers = [tmp_path / "checkpoints" / ".step-00000004.x1y2.tmp", tmp_path / ".metrics.csv.ab.tmp",
                 tmp_path / "checkpoints" / ".latest.cd.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"\0" * 1000)
    for path in leftovers[1:]:
        path.write_text("half")
    records = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "environment.json", "metrics.csv")}
    other_seed = dataclasses.replace(cfg, resume="auto", seed=1, max_steps=3)  # another data order: refused
    with pytest.raises(ValueError, match="sampler state has seed=0 but this run has 1"):
        build_trainer(other_seed, *make_job(other_seed))
    assert {name: (tmp_path / name).read_bytes() for name in records} == records
    assert not any(path.exists() for path in leftovers)
    build_trainer(dataclasses.replace(cfg, resume="auto", max_steps=3), *make_job(cfg)).fit()
    assert [s["from_step"] for s in json.loads((tmp_path / "environment.json").read_text())] == [0, 2]


# ---------------------------------------------------------------------------- kills of real training processes

KILLS = int(os.environ.get("STAR_FAULT_KILLS", "0"))  # per case; 0 = one trial
# the first inside-write trial: killed after the second save renamed its dir into place but before `latest`
# named it, then while the resumed run saves that step again (the old copy moved aside, the new not yet in place)
FIRST_FAULTS = ("renamed@2", "old-moved-aside@1")


def _child(args, fault, threads):
    # data-loader workers are forked from this process, not the server: killed with it, their parent changes,
    # and they exit (from the server they would outlive it)
    multiprocessing.set_start_method("fork", force=True)
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(threads)  # the reference run's: another count sums in another order (float rounding)
    if fault:
        os.environ["STAR_FAULT_INJECT"] = fault
    sys.exit(main([str(a) for a in args]))


# Processes are forked from a server that imported star but never trained: forked from pytest, whose OpenMP
# threads have run, a child hangs in its first parallel op. (The server cannot preload this module: Python
# 3.11's forkserver ignores the sys.path it is given.)
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["star.cli.train"])


def start(args, fault=None):
    """`star ARGS` in a new process (with STAR_FAULT_INJECT=fault)."""
    process = FORKSERVER.Process(target=_child, args=(args, fault, torch.get_num_threads()))
    process.start()
    return process


def last_step(run) -> int:
    try:
        return max(losses(run), default=0)
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def wait_for_step(process, run, step: int) -> None:
    """Until `process`, training `run`, has logged `step` or ended."""
    deadline = time.monotonic() + 300
    while process.is_alive() and last_step(run) < step and time.monotonic() < deadline:
        time.sleep(0.005)


def kill_at(process, run, step: int, delay: float) -> None:
    """SIGKILL `process` `delay` seconds after `run` logged `step` (unless it ends first)."""
    wait_for_step(process, run, step)
    time.sleep(delay)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)


def draw_fault(rng, resumed: bool) -> str:
    """A fault point and the save that reaches it: one a fresh run (3 saves, the last 2 pruning) always reaches,
    or, resumed, any point at its first save, which that run may not reach."""
    if resumed:
        return f"{rng.choice(FAULT_POINTS)}@1"
    point = rng.choice([p for p in FAULT_POINTS if p != "old-moved-aside"])
    return f"{point}@{rng.randint(1, 2 if point == 'pruning' else 3)}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["random", "inside-write"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, uninterrupted, task, workers, mode):
    reference = uninterrupted(task, workers)
    job = [*JOBS[task], "--data.num_workers", workers]
    max_steps = max(losses(reference))
    rng = random.Random(f"{os.environ.get('STAR_FAULT_SEED', 0)}/{task}/{workers}/{mode}")
    kills_per_trial, landed, trial = 1 if mode == "random" else len(FIRST_FAULTS), [], 0
    while trial == 0 or (sum(landed) < KILLS and trial < 3 * KILLS):  # until KILLS kills have landed
        run, kills = tmp_path / f"trial{trial}", []
        for attempt in range(kills_per_trial):
            resume = ["--resume", "auto"] if attempt else []
            if mode == "random":
                step, delay = rng.randint(1, max_steps), rng.uniform(0, 0.06)
                process = start([*job, "--output_dir", run, *resume])
                kill_at(process, run, step, delay)
                kills.append(f"{delay * 1000:.0f} ms after step {step}")
            else:
                fault = FIRST_FAULTS[attempt] if trial == 0 else draw_fault(rng, resumed=bool(attempt))
                process = start([*job, "--output_dir", run, *resume], fault)
                kills.append(fault)
            process.join(300)
            assert process.exitcode in (0, -signal.SIGKILL), (kills, process.exitcode)
            assert process.exitcode or trial or mode == "random", kills  # the first pair is always reached
            kills[-1] += "" if process.exitcode else " (finished first)"
            landed.append(process.exitcode == -signal.SIGKILL)
        assert star(*job, "--output_dir", run, "--resume", "auto") == 0, kills
        assert_same_run(run, reference)
        # no leftovers of the killed saves (a checkpoint --keep_last would drop stays until the next save prunes)
        assert latest_checkpoint(run).name == f"step-{max_steps:08d}", kills
        assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], kills
        trial += 1
    print(f"{sum(landed)} of {len(landed)} kills landed (the others' runs ended first or never reached the point)")


def test_a_second_process_on_a_live_run_is_refused(tmp_path, uninterrupted, capsys):
    reference = uninterrupted("pretrain", 0)
    run = tmp_path / "run"
    first = start([*JOBS["pretrain"], "--data.num_workers", 0, "--output_dir", run])
    wait_for_step(first, run, 1)
    os.kill(first.pid, signal.SIGSTOP)  # alive, mid-run, for as long as this takes (it would finish in a second)
    try:
        assert first.is_alive()
        capsys.readouterr()
        for resume in ([], ["--resume", "auto"]):
            assert star(*JOBS["pretrain"], "--output_dir", run, *resume) == 2
            assert f"{run} is in use by another star run (pid {first.pid})" in capsys.readouterr().err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join(300)
    assert first.exitcode == 0
    assert_same_run(run, reference)
