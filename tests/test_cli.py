"""The `star` command end to end on tiny synthetic data, and its answers to bad input."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from star.cli.main import main
from star.data import write_image_folder

# 16 px grayscale, 4x4 patch grid, 2x2-patch clusters, a 2-block model of width 32
TINY = ["--model.embed_dim", "32", "--model.depth", "2", "--model.img_size", "16", "--model.patch_size", "4",
        "--model.in_chans", "1", "--data.num_workers", "0", "--data.mean_std", "small-grayscale",
        "--optim.batch_size", "16", "--optim.epochs", "1", "--optim.warmup_epochs", "0", "--log_every", "1",
        "--device", "cpu", "--model.scan_impl", "chunked"]
SYNTHETIC = ["--data.dataset", "synthetic", "--data.num_samples", "64"]
PRETRAIN = TINY + ["--model.cluster_size", "2", "--model.decoder_dim", "32", "--model.decoder_num_heads", "4"]
FINETUNE = TINY + ["--data.val_size", "16", "--model.num_classes", "10", "--data.auto_augment", "none"]


def star(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", out) == 0
    return out


def test_pretrain_finetune_eval_predict(pretrained, tmp_path, capsys):
    assert (pretrained / "model" / "config.json").is_file() and (pretrained / "metrics.csv").is_file()
    assert (pretrained / "config.yaml").is_file()
    [env] = json.loads((pretrained / "environment.json").read_text())  # where the run was made
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu") and env["world_size"] == 1
    ft = tmp_path / "ft"
    assert star("finetune", *FINETUNE, *SYNTHETIC, "--pretrained", pretrained, "--output_dir", ft) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and "head.weight" in out
    assert star("eval", ft, "--split", "test", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "test: 256 images, top-1" in out
    # --split val is the holdout the run validated on (data.val_size), with the accuracy training logged
    assert star("eval", ft, "--split", "val", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert out.startswith("val (16 training images held out by data.val_size, as in training): 16 images")
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    assert top1 == pytest.approx(metric_column(ft, "val/top1")[-1], abs=0.01)
    # a dataset without a val split says which split it evaluated
    from test_data import _fake_fashion_mnist

    fake = _fake_fashion_mnist(tmp_path / "fmnist", n_test=12)
    assert star("eval", ft, "--split", "val", "--data.dataset", "fashion-mnist", "--data.root", fake,
                "--data.val_size", "0", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith("val (= the test split of fashion-mnist, which has no val split): 12 images")
    # predict names classes from the run's classes.json
    classes = json.loads((ft / "model" / "classes.json").read_text())
    img = tmp_path / "a.png"
    Image.new("L", (16, 16), 128).save(img)
    assert star("predict", ft, img, "--topk", "3", "--device", "cpu") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(img)) and sum(name in line for name in classes) == 3
    # the pretrained model draws its next-cluster predictions
    png = tmp_path / "pred.png"
    assert star("visualize", pretrained, "--out", png, "--sequences", "2", "--device", "cpu") == 0
    assert Image.open(png).size[0] > 100


def test_linprobe_trains_only_the_head(pretrained, tmp_path):
    out = tmp_path / "lp"
    assert star("linprobe", *FINETUNE, *SYNTHETIC, "--pretrained", pretrained, "--output_dir", out) == 0
    from star import load_pretrained
    from safetensors.torch import load_file

    probe = load_pretrained(out / "model")
    pre = load_file(str(pretrained / "model" / "model.safetensors"))
    assert torch.equal(probe.state_dict()["blocks.0.mixer.in_proj.weight"], pre["blocks.0.mixer.in_proj.weight"])


def metric_column(run, name: str) -> list[float]:
    """One column of a run's metrics.csv, the rows that logged it."""
    with open(run / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_compile_flag_trains_like_eager(pretrained, tmp_path, monkeypatch):
    """`--compile` runs the training steps through torch.compile (AOT autograd without codegen here, to stay
    fast on the CPU): same losses as the eager run, which the module fixture made."""
    compiled, torch_compile = [], torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled.append(type(model).__name__)
        return torch_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    out = tmp_path / "compiled"
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", out, "--compile") == 0
    assert compiled == ["StarPretrain"]
    assert metric_column(out, "train/loss") == pytest.approx(metric_column(pretrained, "train/loss"), rel=1e-4)


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, capsys):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", tmp_path / "a", "--compile", "--max_steps", "1",
                "--compile_mode", "max-autotune-no-cudagraphs") == 0
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", tmp_path / "b", "--compile", "--max_steps", "1") == 0
    assert modes == ["max-autotune-no-cudagraphs", None]
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", tmp_path / "c",
                "--compile_mode", "reduce-overhead") != 0  # a mode without --compile is refused, not ignored
    assert "takes effect only with --compile" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--output_dir", tmp_path / "d", "--compile", "--compile_mode",
                "reduce-overhead", "--optim.accum_iter", "2") != 0  # graph replays would overwrite the gradients
    assert "does not support gradient accumulation" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_compile_trains_like_eager_on_cuda(tmp_path):
    """--compile_mode reduce-overhead (each step replayed as CUDA graphs, the Triton scan inside) trains and
    evaluates like eager: two epochs, so training, evaluation and training again alternate."""
    gpu = [*FINETUNE, *SYNTHETIC, "--pretrained", "none", "--device", "cuda", "--amp", "none",
           "--model.scan_impl", "triton", "--optim.epochs", "2"]
    assert star("finetune", *gpu, "--output_dir", tmp_path / "eager") == 0
    assert star("finetune", *gpu, "--output_dir", tmp_path / "graphs", "--compile", "--compile_mode",
                "reduce-overhead") == 0
    graphs, eager = tmp_path / "graphs", tmp_path / "eager"
    assert metric_column(graphs, "train/loss") == pytest.approx(metric_column(eager, "train/loss"), rel=1e-3)
    assert metric_column(graphs, "val/loss") == pytest.approx(metric_column(eager, "val/loss"), rel=1e-3)
    assert len(metric_column(graphs, "val/loss")) == 2


def test_failed_run_frees_its_model_before_leaving_the_process_group(tmp_path, monkeypatch):
    """A run that fails is left by `run` with its trainer and model freed, not kept by the traceback until
    interpreter exit (where freeing a sharded model after its process group aborted the process)."""
    import gc
    import weakref

    from star.cli import train as cli_train
    from star.training import Trainer
    from star.config import apply_overrides, load_config

    models, freed = [], []

    def failing_fit(trainer):
        models.append(weakref.ref(trainer.model))
        raise RuntimeError("killed")

    def destroy():
        gc.collect()
        freed.append(models[0]() is None)

    monkeypatch.setattr(Trainer, "fit", failing_fit)
    monkeypatch.setattr(cli_train, "destroy_distributed", destroy)
    cfg = apply_overrides(load_config("fmnist-tiny", "pretrain"),
                          [str(a) for a in PRETRAIN + SYNTHETIC + ["--output_dir", tmp_path]])
    with pytest.raises(RuntimeError, match="killed"):
        cli_train.run(cfg)
    assert freed == [True]


def test_config_errors_name_the_field(capsys):
    assert star("pretrain", "--optim.blrr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "optim.blrr" in err and "optim.blr" in err
    assert star("pretrain", "--model.separator", "dots") == 2
    assert "model.separator" in capsys.readouterr().err
    assert star("pretrain", "--config", "no-such-preset") == 2
    assert "fmnist-tiny" in capsys.readouterr().err


def test_k_larger_than_batch(tmp_path, capsys):
    args = PRETRAIN + SYNTHETIC + ["--model.num_images", "8", "--optim.batch_size", "4", "--output_dir", tmp_path]
    assert star("pretrain", *args) == 2
    assert "does not fit a batch of 4 images" in capsys.readouterr().err


def test_bad_image_folders(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_image_folder(root, num_per_class=8, classes=["a", "b"], img_size=16, in_chans=1, seed=0)
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    folder = ["--data.dataset", root]
    assert star("pretrain", *PRETRAIN, *folder, "--optim.batch_size", "8", "--output_dir", tmp_path / "r1") == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert star("pretrain", *PRETRAIN, *folder, "--optim.batch_size", "8", "--data.skip_corrupt", "true",
                "--output_dir", tmp_path / "r2") == 0
    assert "skipped 1 corrupt" in capsys.readouterr().out
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    assert star("pretrain", *PRETRAIN, "--data.dataset", empty, "--output_dir", tmp_path / "r3") == 2
    assert str(empty / "train") in capsys.readouterr().err


def test_checkpoint_of_another_architecture(pretrained, tmp_path, capsys):
    other = tmp_path / "other"
    args = PRETRAIN + SYNTHETIC + ["--model.embed_dim", "48", "--max_steps", "1", "--output_dir", other]
    assert star("pretrain", *args) == 0
    # resuming a run with weights of another width lists the mismatched keys
    args = PRETRAIN + SYNTHETIC + ["--resume", other, "--output_dir", tmp_path / "again"]
    assert star("pretrain", *args) == 2
    err = capsys.readouterr().err
    assert "mismatched keys" in err and "checkpoint (48" in err
    # a classifier is not a pretraining model to start from
    assert star("eval", pretrained, "--device", "cpu") == 2
    assert "StarPretrain" in capsys.readouterr().err


def test_predict_wrong_channels_and_unreadable_files(pretrained, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert star("finetune", *FINETUNE, *SYNTHETIC, "--pretrained", "none", "--max_steps", "1", "--output_dir", ft) == 0
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(rgb)
    assert star("predict", ft, rgb, "--device", "cpu") == 2
    assert "3 channel(s)" in capsys.readouterr().err
    assert star("predict", ft, rgb, "--convert", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith(f"{rgb}: ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"junk")
    good = tmp_path / "good.png"
    Image.new("L", (16, 16), 7).save(good)
    assert star("predict", ft, broken, good, rgb, "--device", "cpu") == 2  # the good file still gets its answer
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    assert "broken.png" in err and "rgb.png has 3 channel(s)" in err


def test_head_size_channels_and_augmentation_are_checked_against_the_data(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_image_folder(root, num_per_class=4, classes=[f"c{i}" for i in range(12)], img_size=16, in_chans=1, seed=0)
    base = FINETUNE + ["--data.val_size", "0", "--pretrained", "none", "--max_steps", "1"]
    assert star("finetune", *base, "--data.dataset", root, "--output_dir", tmp_path / "a") == 2
    assert "12 classes; set --model.num_classes 12" in capsys.readouterr().err
    assert star("finetune", *base, *SYNTHETIC, "--data.mean_std", "imagenet", "--output_dir", tmp_path / "b") == 2
    assert "normalizes 3-channel images but the model takes 1" in capsys.readouterr().err
    assert star("finetune", *base, *SYNTHETIC, "--data.auto_augment", "bogus", "--output_dir", tmp_path / "c") == 2
    assert "--data.auto_augment 'bogus'" in capsys.readouterr().err


def test_model_folder_alone_keeps_its_preprocessing(tmp_path, capsys):
    ft = tmp_path / "ft"
    args = FINETUNE + SYNTHETIC + ["--pretrained", "none", "--max_steps", "1", "--output_dir", ft]
    assert star("finetune", *args) == 0
    assert "no --pretrained" in capsys.readouterr().out
    alone = tmp_path / "shared" / "model"
    alone.parent.mkdir()
    (ft / "model").rename(alone)  # a saved model folder without its run directory
    img = tmp_path / "a.png"
    Image.new("L", (16, 16), 128).save(img)
    assert star("predict", alone, img, "--topk", "2", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith(str(img))
    # a 16-bit grayscale PNG is scaled to 8 bits, not clipped to white
    from star.data import convert_image
    deep = Image.fromarray((torch.arange(256).reshape(16, 16) * 257).numpy().astype("uint16"))  # 8-bit v -> 257 v
    assert deep.mode.startswith("I;16")
    assert np.array_equal(np.asarray(convert_image(deep, "L")).ravel(), np.arange(256))


def test_print_config_and_help(capsys, tmp_path):
    with pytest.raises(SystemExit):
        star("finetune", "--help")
    out = capsys.readouterr().out
    assert "--optim.blr: float (built-in default" in out
    # every field says what it is, and what None means
    assert "--optim.batch_size: int (built-in default 64): images per optimizer micro-step per device" in out
    assert "--model.depth: int or none (built-in default None): None = the value model.name is registered with" in out
    assert "--data.scale_min: float (built-in default 0.2): RandomResizedCrop scale" in out  # not its section heading
    # one flag style, underscores as in the config fields; hyphens work too
    for flag, blr in (("--print_config", "--optim.blr"), ("--print-config", "--optim.blr"),
                      ("--print_config", "--optim.warmup-epochs")):
        assert star("finetune", "--config", "fmnist-tiny", flag, blr, "0.5") == 0
        assert ("blr: 0.5" if blr == "--optim.blr" else "warmup_epochs: 0.5") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        star("--version")
    assert capsys.readouterr().out.startswith("star 0.1.0")


def test_cpu_threads_wait_passively_unless_told(monkeypatch, capsys):
    """Spinning OpenMP threads made CPU steps 5-12x slower on busy shared cores; `star` asks for passive
    waiting, but a policy the user set wins."""
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert star("configs") == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert star("configs") == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_unfinished_runs_are_used_from_their_latest_checkpoint(pretrained, tmp_path, capsys):
    """A killed run has checkpoints but no model/: eval, predict, visualize and --pretrained take its latest
    checkpoint (with a note), and it gives what the finished model gives."""
    import shutil

    killed = tmp_path / "killed-pre"
    shutil.copytree(pretrained, killed)
    shutil.rmtree(killed / "model")
    assert star("visualize", killed, "--out", tmp_path / "p.png", "--sequences", "1", "--device", "cpu") == 0
    assert "using its latest checkpoint" in capsys.readouterr().err
    ft = tmp_path / "ft"
    assert star("finetune", *FINETUNE, *SYNTHETIC, "--pretrained", killed, "--output_dir", ft) == 0
    assert star("eval", ft, "--device", "cpu") == 0
    finished = capsys.readouterr().out.splitlines()[-1]
    shutil.rmtree(ft / "model")
    assert star("eval", ft, "--device", "cpu") == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == finished and "checkpoints/step-" in err
    assert star("eval", tmp_path / "nothing-here", "--device", "cpu") == 2
    assert "holds no saved model" in capsys.readouterr().err


def test_snapshots_keep_the_model_at_every_nth_epoch(tmp_path, capsys):
    """--snapshot_every 1 over 2 epochs: model_epoch0001 and model_epoch0002 beside model/; the last equals the
    final model, the first differs from it, and a fine-tune starts from a snapshot as from a run."""
    from safetensors.torch import load_file

    out = tmp_path / "pre"
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--optim.epochs", "2", "--snapshot_every", "1",
                "--output_dir", out) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model", "model_epoch0001", "model_epoch0002"]
    final, first, last = (load_file(out / name / "model.safetensors")
                          for name in ("model", "model_epoch0001", "model_epoch0002"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], first[k]) for k in final)
    ft = tmp_path / "ft"
    assert star("finetune", *FINETUNE, *SYNTHETIC, "--pretrained", out / "model_epoch0001", "--output_dir", ft,
                "--snapshot_every", "1") == 0
    assert f"initialised from {out / 'model_epoch0001'}" in capsys.readouterr().out
    # a classifier's snapshot names its classes, as its model/ does, for `star predict`
    assert (ft / "model_epoch0001" / "classes.json").read_text() == (ft / "model" / "classes.json").read_text()
    assert star("pretrain", *PRETRAIN, *SYNTHETIC, "--snapshot_every", "-1", "--output_dir", tmp_path / "bad") == 2
    assert "--snapshot_every must be >= 0" in capsys.readouterr().err
