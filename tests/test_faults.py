"""Nothing lost under faults: kills (SIGKILL at random moments and inside checkpoint writes), corrupt files,
a full disk, two writers on one run, divergence and hostile images, on tiny synthetic runs of the `star` CLI.

Each kill trial forks a real training process from this one (no second interpreter start-up), kills it,
resumes, and compares the losses and final weights with an uninterrupted run. By default one trial per case
runs; `STAR_FAULT_TRIALS=20` (marked slow) runs 20 per case.
"""

import csv

import pytest
import torch
from safetensors.torch import load_file

from test_cli import SYNTHETIC, TINY, star

PRE = ["pretrain", *TINY, "--model.cluster_size", "2", "--model.decoder_dim", "32", "--model.decoder_num_heads", "4"]
FINE = ["finetune", *TINY, "--data.val_size", "16", "--model.num_classes", "10", "--pretrained", "none"]
# pretraining: 64 images / 16 = 4 steps per epoch; fine-tuning: 48 / 16 = 3; 8 and 6 steps in all. Random
# crops and flips (and RandAugment's defaults for fine-tuning) make every sample depend on the RNG.
JOBS = {"pretrain": PRE + SYNTHETIC + ["--optim.epochs", "2"],
        "finetune": FINE + SYNTHETIC + ["--optim.epochs", "2"]}


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


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("task, stops", [("pretrain", (2, 4)), ("finetune", (2, 3))])
def test_resume_with_workers_retraces_the_uninterrupted_run(tmp_path, task, stops, workers):
    """Stopped mid-epoch and at an epoch's end, then resumed: the same run as one that never stopped, also
    with data-loader workers (whose augmentation randomness used to restart from a new seed on resume)."""
    job = [*JOBS[task], "--data.num_workers", workers]
    assert star(*job, "--output_dir", tmp_path / "full") == 0
    for stop in stops:
        assert star(*job, "--output_dir", tmp_path / "split", "--resume", "auto", "--max_steps", stop) == 0
    assert star(*job, "--output_dir", tmp_path / "split", "--resume", "auto") == 0
    assert_same_run(tmp_path / "split", tmp_path / "full")
