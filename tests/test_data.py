import gzip
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import star.data.fashion_mnist_files as fmnist
from star.data import (
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, FashionMNIST,
    ImageFolder, LabeledSubset, SyntheticImages, build_dataset, build_mixup, find_fashion_mnist, finetune_transform,
    label_subset, pretrain_transform, train_val_split, write_image_folder,
)


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion_train():
    try:
        return FashionMNIST(split="train")
    except FileNotFoundError as err:
        pytest.skip(f"real Fashion-MNIST not available: {err}")


def test_fashion_mnist_real_data(fashion_train):
    test = build_dataset("fashion-mnist", "test")
    assert (len(fashion_train), len(test)) == (60000, 10000)
    assert len(build_dataset("fashion-mnist", "val")) == 10000  # no official val split: val means test
    img, label = fashion_train[0]
    assert img.mode == "L" and img.size == (28, 28)
    assert isinstance(label, int) and label == fashion_train.targets[0]
    assert fashion_train.classes[0] == "T-shirt/top" and fashion_train.classes[9] == "Ankle boot"
    assert len(fashion_train.classes) == 10
    assert Counter(fashion_train.targets) == {c: 6000 for c in range(10)}
    assert Counter(test.targets) == {c: 1000 for c in range(10)}
    rgb, _ = build_dataset("fashion-mnist", "train", in_chans=3)[0]
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], np.asarray(img))


def test_fashion_mnist_stats_match_preset(fashion_train):
    pixels = fashion_train.images.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-4)
    assert pixels.std() == pytest.approx(FASHION_MNIST_STD[0], abs=1e-4)


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder, compress=True, n_train=5, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return folder


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Point every default search place at empty folders under tmp_path."""
    monkeypatch.delenv("STAR_DATA", raising=False)
    monkeypatch.setattr(fmnist, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(fmnist, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fmnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_find_fashion_mnist_order(no_default_data, monkeypatch):
    tmp = no_default_data
    system = _fake_fashion_mnist(tmp / "system")
    assert find_fashion_mnist() == system
    shared = _fake_fashion_mnist(tmp / "shared" / "data" / "fashion-mnist")  # ../shared from repo root tmp/repo
    assert find_fashion_mnist() == shared
    nested = _fake_fashion_mnist(tmp / "env" / "fashion-mnist")
    monkeypatch.setenv("STAR_DATA", str(tmp / "env"))
    assert find_fashion_mnist() == nested
    direct = _fake_fashion_mnist(tmp / "direct", compress=False)
    monkeypatch.setenv("STAR_DATA", str(direct))
    assert find_fashion_mnist() == direct
    explicit = _fake_fashion_mnist(tmp / "explicit")
    assert find_fashion_mnist(explicit) == explicit


def test_find_fashion_mnist_error_lists_places(no_default_data, monkeypatch):
    tmp = no_default_data
    monkeypatch.setenv("STAR_DATA", str(tmp / "env"))
    (tmp / "env").mkdir()
    (tmp / "env" / "train-images-idx3-ubyte.gz").touch()  # incomplete folder does not count
    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist()
    message = str(info.value)
    for place in (tmp / "env", tmp / "env" / "fashion-mnist", tmp / "shared" / "data" / "fashion-mnist",
                  tmp / "system", tmp / "cache"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "STAR_DATA" in message
    assert "star download fashion-mnist" in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_fashion_mnist(tmp / "nowhere")


def test_data_check_needs_only_the_standard_library(tmp_path):
    """scripts/demo.sh runs the finder with the system python before any set-up: no site-packages (-S)."""
    import shutil
    import subprocess
    import sys

    script = tmp_path / "repo" / "src" / "star" / "data" / "fashion_mnist_files.py"  # no ../shared beside it
    script.parent.mkdir(parents=True)
    shutil.copy(fmnist.__file__, script)
    env = {"STAR_DATA": str(_fake_fashion_mnist(tmp_path / "env")), "HOME": str(tmp_path)}
    run = dict(capture_output=True, text=True, env=env, cwd=tmp_path)
    found = subprocess.run([sys.executable, "-S", str(script)], **run)
    assert found.returncode == 0 and found.stdout.strip() == str(tmp_path / "env")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():  # Debian's package would be found
        env["STAR_DATA"] = str(tmp_path / "empty")
        missing = subprocess.run([sys.executable, "-S", str(script)], **run)
        assert missing.returncode == 1 and "Fashion-MNIST not found" in missing.stderr
        assert "star download fashion-mnist" in missing.stderr
        # and the demo stops there, before its set-up (which is not even in this copy of the repo)
        demo = tmp_path / "repo" / "scripts" / "demo.sh"
        demo.parent.mkdir()
        shutil.copy(Path(__file__).resolve().parents[1] / "scripts" / "demo.sh", demo)
        stopped = subprocess.run(["bash", str(demo)], **{**run, "env": {**env, "PYTHON": sys.executable,
                                                                       "PATH": os.environ["PATH"]}})
        assert stopped.returncode == 1 and "Fashion-MNIST not found" in stopped.stderr
        assert "bash scripts/demo.sh --download" in stopped.stderr and "setup.sh" not in stopped.stderr


def test_download_fashion_mnist_puts_the_files_where_they_are_found(no_default_data, monkeypatch, tmp_path):
    """torchvision's downloader (replaced here: no network) leaves FashionMNIST/raw/*; star copies the four
    IDX files into its cache folder, which the search then finds; a failed download is one clear error."""
    import torchvision.datasets

    from star.data import download_fashion_mnist

    class FakeTorchvision:
        def __init__(self, root, train, download):
            assert download
            _fake_fashion_mnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeTorchvision)
    monkeypatch.setattr("star.data.fashion_mnist.CACHE_DIR", tmp_path / "cache")
    assert download_fashion_mnist() == tmp_path / "cache" == find_fashion_mnist()
    assert len(FashionMNIST(split="test")) == 3
    from star.cli.main import main

    assert main(["download", "fashion-mnist", "--to", str(tmp_path / "cli")]) == 0
    assert find_fashion_mnist(tmp_path / "cli") == tmp_path / "cli"

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(ValueError, match="could not download Fashion-MNIST .*STAR_DATA"):
        download_fashion_mnist(tmp_path / "elsewhere")
    assert main(["download", "fashion-mnist"]) == 2


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_gz_and_raw_idx(tmp_path, compress):
    folder = _fake_fashion_mnist(tmp_path / "fm", compress=compress)
    train = FashionMNIST(folder, "train")
    test = FashionMNIST(folder, "test", transform=T.ToTensor())
    assert (len(train), len(test)) == (5, 3)
    assert train.targets == [0, 1, 2, 3, 4]
    x, y = test[2]
    assert x.shape == (1, 28, 28) and y == 2
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(folder, "validation")


# ----------------------------------------------------------------------------- subsets

def test_train_val_split():
    train, val = train_val_split(100, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80 and sorted(train + val) == list(range(100))
    assert (train, val) == train_val_split(100, 20, seed=1)
    assert val != train_val_split(100, 20, seed=2)[1]
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(10, 10)
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(10, 1.5)


def test_label_subset_class_balance():
    targets = [0] * 500 + [1] * 300 + [2] * 200
    subset = label_subset(targets, 0.1, seed=0)
    assert Counter(targets[i] for i in subset) == {0: 50, 1: 30, 2: 20}
    assert subset == label_subset(targets, 0.1, seed=0) and subset != label_subset(targets, 0.1, seed=1)
    assert len(set(subset)) == len(subset)
    rare = label_subset([0] * 1000 + [1] * 10, 0.01, seed=0)  # every class keeps at least one label
    assert Counter(1 if i >= 1000 else 0 for i in rare) == {0: 10, 1: 1}
    with pytest.raises(ValueError, match="fraction"):
        label_subset(targets, 0.0)


def test_label_subset_real_one_percent(fashion_train):
    subset = LabeledSubset(fashion_train, label_subset(fashion_train.targets, 0.01, seed=0))
    assert len(subset) == 600 and Counter(subset.targets) == {c: 60 for c in range(10)}
    assert subset.classes == fashion_train.classes and subset[0][1] == subset.targets[0]


# ----------------------------------------------------------------------------- image folders

@pytest.fixture
def rgb_folder(tmp_path):
    return write_image_folder(tmp_path / "rgb", num_per_class=3, classes=["cat", "dog"], img_size=16, in_chans=3)


def test_image_folder_layout_and_modes(rgb_folder, tmp_path):
    train = build_dataset(str(rgb_folder), "train")
    assert isinstance(train, ImageFolder)
    assert train.classes == ["cat", "dog"] and train.targets == [0, 0, 0, 1, 1, 1] and len(train) == 6
    img, label = train[4]
    assert img.mode == "RGB" and img.size == (16, 16) and label == 1
    gray, _ = ImageFolder(rgb_folder, "val", in_chans=1)[0]
    assert gray.mode == "L"
    gray_folder = write_image_folder(tmp_path / "gray", 2, 2, img_size=16, in_chans=1)
    assert Image.open(next((gray_folder / "train" / "class_0").iterdir())).mode == "L"
    as_rgb, _ = ImageFolder(gray_folder, "train", in_chans=3)[0]
    assert as_rgb.mode == "RGB"
    with pytest.raises(ValueError, match="in_chans"):
        ImageFolder(rgb_folder, "train", in_chans=2)


def test_image_folder_val_uses_train_classes(rgb_folder):
    for image in (rgb_folder / "val" / "cat").iterdir():
        image.unlink()
    (rgb_folder / "val" / "cat").rmdir()
    val = ImageFolder(rgb_folder, "val")
    assert val.classes == ["cat", "dog"] and set(val.targets) == {1}
    (rgb_folder / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        ImageFolder(rgb_folder, "val")


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected layout") as info:
        ImageFolder(tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in str(info.value)
    (tmp_path / "noclasses" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path / "noclasses", "train")
    (tmp_path / "noimages" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no images found") as info:
        ImageFolder(tmp_path / "noimages", "train")
    assert str(tmp_path / "noimages" / "train") in str(info.value)
    with pytest.raises(FileNotFoundError, match="'val' not found"):
        ImageFolder(tmp_path / "noimages", "val")


@pytest.fixture
def corrupt_folder(rgb_folder):
    """Two bad files in class 'cat': garbage bytes and a truncated JPEG."""
    cat = rgb_folder / "train" / "cat"
    (cat / "00000.jpg").write_bytes(b"definitely not a jpeg")
    good = (cat / "00001.jpg").read_bytes()
    (cat / "00001.jpg").write_bytes(good[: len(good) // 2])
    return rgb_folder


def test_corrupt_image_raises_naming_file(corrupt_folder):
    dataset = ImageFolder(corrupt_folder, "train")
    for index in (0, 1):
        with pytest.raises(CorruptImageError, match=f"0000{index}.jpg"):
            dataset[index]
    assert issubclass(CorruptImageError, ValueError) and issubclass(CorruptImageError, OSError)
    assert dataset[2][0].mode == "RGB"


def test_skip_corrupt_skips_and_counts(corrupt_folder):
    dataset = ImageFolder(corrupt_folder, "train", transform=T.ToTensor(), skip_corrupt=True)
    image, label = dataset[0]
    assert torch.equal(image, dataset[2][0]) and label == 0  # the next good sample, deterministically
    assert dataset.num_skipped == 2
    assert [p.rsplit("/", 1)[1] for p in dataset.skipped_paths] == ["00000.jpg", "00001.jpg"]


def test_skip_corrupt_counted_across_workers(corrupt_folder):
    dataset = ImageFolder(corrupt_folder, "train", transform=T.ToTensor(), skip_corrupt=True)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == 6
    assert dataset.num_skipped == 2  # flags set in worker processes reach the main process


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_deterministic_and_balanced():
    a = SyntheticImages(40, img_size=16, in_chans=3, num_classes=4, seed=0)
    b = SyntheticImages(40, img_size=16, in_chans=3, num_classes=4, seed=0)
    assert a.targets == b.targets and Counter(a.targets) == {c: 10 for c in range(4)}
    assert all(np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) for i in (0, 17, 39))
    other = SyntheticImages(40, 16, 3, 4, seed=1)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other[0][0]))
    train, val = build_dataset("synthetic", "train"), build_dataset("synthetic", "val")
    assert (len(train), len(val), len(train.classes)) == (1024, 256, 10)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(val[0][0]))
    gray, _ = build_dataset("synthetic", "train", in_chans=1, img_size=20)[0]
    assert gray.mode == "L" and gray.size == (20, 20)


def test_synthetic_classes_are_separable():
    """Nearest class mean of the (phase-invariant) Fourier magnitude must classify held-out images."""
    def features(dataset):
        images = np.stack([np.asarray(dataset[i][0], dtype=np.float64) for i in range(len(dataset))])
        return np.abs(np.fft.fft2(images - images.mean(axis=(1, 2), keepdims=True))).reshape(len(dataset), -1)

    train = SyntheticImages(200, 16, 1, 10, seed=0)
    test = SyntheticImages(100, 16, 1, 10, seed=0, stream=1)
    train_x, test_x = features(train), features(test)
    means = np.stack([train_x[np.array(train.targets) == c].mean(0) for c in range(10)])
    predicted = np.argmin(((test_x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == np.array(test.targets)).mean() > 0.9


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("mode, mean, std", [("L", FASHION_MNIST_MEAN, FASHION_MNIST_STD),
                                             ("RGB", IMAGENET_MEAN, IMAGENET_STD)])
def test_transform_shapes(mode, mean, std):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).convert(mode)
    channels = len(mean)
    for transform, size in ((pretrain_transform(32, mean, std, scale=(0.6, 1.0)), 32),
                            (finetune_transform(32, mean, std, train=True), 32),
                            (finetune_transform(32, mean, std, train=True, auto_augment=None, color_jitter=0.4), 32),
                            (finetune_transform(32, mean, std, train=False, crop_pct=1.0), 32),
                            (finetune_transform(24, mean, std, train=False), 24)):
        for _ in range(5):
            out = transform(img)
            assert out.shape == (channels, size, size) and out.dtype == torch.float32


@pytest.mark.parametrize("mode, mean", [("L", FASHION_MNIST_MEAN), ("RGB", IMAGENET_MEAN)])
def test_randaugment_every_op_at_max_magnitude(mode, mean):
    """Each RandAugment op, forced on at magnitude 10, must run on this image mode (fill colours, posterize)."""
    transform = finetune_transform(32, mean, mean, train=True)
    rand_augment = next(t for t in transform.transforms if hasattr(t, "ops"))
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)).convert(mode)
    for op in rand_augment.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        out = op(img)
        assert out.mode == mode and out.size == img.size, op.name
        if op.name == "PosterizeIncreasing":  # 0 bits kept: black, as with older Pillow
            assert np.asarray(out).max() == 0


def test_build_mixup():
    assert build_mixup(0.0, 0.0, 0.1, 10) is None
    mixup = build_mixup(0.8, 1.0, 0.1, num_classes=10)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    mixed_x, soft_y = mixup(x, y)
    assert mixed_x.shape == x.shape and soft_y.shape == (4, 10)
    assert torch.allclose(soft_y.sum(1), torch.ones(4)) and soft_y.min() > 0  # smoothing spreads mass


def test_build_dataset_unknown_name():
    with pytest.raises(ValueError, match="fashion-mnist, synthetic") as info:
        build_dataset("cifar10", "train")
    assert "ImageNet-layout" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", "training")


def test_synthetic_zero_sizes_are_errors_not_defaults():
    for kw in (dict(num_samples=0), dict(img_size=0), dict(in_chans=0), dict(num_classes=0)):
        with pytest.raises(ValueError):
            build_dataset("synthetic", "train", **kw)


def test_corrupt_fashion_mnist_file_names_itself(tmp_path):
    import gzip

    from star.data.fashion_mnist import _read_idx
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10" + bytes(16))[:20])
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"not gzip")
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08"))
    for path in (cut, not_gzip, short):
        with pytest.raises(ValueError, match=f"{path.name} is truncated or corrupt"):
            _read_idx(path)
