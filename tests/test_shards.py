"""WebDataset-format tar shards: writer layout, random-access reader, workers, foreign shards, errors."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from star.data import CorruptImageError, ImageFolder, StarBatchSampler, build_dataset, write_image_folder
from star.data.shards import INDEX_NAME, ShardDataset, read_index, write_shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), num_per_class=7, classes=3, img_size=20)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(folder, out, "train", samples_per_shard=8, seed=1)
    write_shards(folder, out, "val", samples_per_shard=100)
    return out


def test_shards_hold_every_image_once_in_webdataset_layout(folder, shards):
    paths = sorted((shards / "train").glob("*.tar"))
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # 21 = 8+8+5
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert len(names) == 16 and names[0].endswith(".jpg") and names[1] == names[0][:-3] + "cls"
    source = ImageFolder(folder, "train")
    originals = {open(p, "rb").read(): label for p, label in source.samples}
    dataset = ShardDataset(shards, "train")
    assert len(dataset) == len(source) == 21 and dataset.classes == source.classes
    stored = {dataset.read_bytes(i): dataset.targets[i] for i in range(len(dataset))}
    assert stored == originals  # the same bytes, each with its own label, none twice
    assert dataset.targets != sorted(dataset.targets)  # shuffled across shards, so shards mix classes


def test_shard_images_decode_like_the_folder(folder, shards):
    source = {open(p, "rb").read(): p for p, _ in ImageFolder(folder, "train").samples}
    dataset = ShardDataset(shards, "train", in_chans=1)
    for i in (0, 9, 20):
        image, label = dataset[i]
        path = source[dataset.read_bytes(i)]
        expected = ImageFolder(folder, "train", in_chans=1)
        assert np.array_equal(np.asarray(image), np.asarray(expected[expected.samples.index((path, label))][0]))
    assert ShardDataset(shards, "val").classes == dataset.classes and len(ShardDataset(shards, "val")) == 21


def test_shards_feed_star_sequences_through_workers(shards):
    dataset = ShardDataset(shards, "train", transform=lambda img: torch.from_numpy(np.asarray(img).copy()))
    sampler = StarBatchSampler(len(dataset), batch_size=4, images_per_seq=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    labels = torch.cat([labels for _, labels in loader])
    served = [i for batch in sampler for i in batch]
    assert labels.tolist() == [dataset.targets[i] for i in served] and len(set(served)) == len(served) == 20


def test_foreign_shards_are_indexed_by_scanning(shards, tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    for path in (shards / "train").glob("*.tar"):
        (split / path.name).write_bytes(path.read_bytes())  # shards without index.json
    scanned = read_index(split)
    assert scanned["shards"] == read_index(shards / "train")["shards"]
    assert scanned["classes"] == ["0", "1", "2"] and not (split / INDEX_NAME).exists()
    assert len(ShardDataset(tmp_path, "train")) == 21


def test_shard_errors(folder, shards, tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(folder, tmp_path, samples_per_shard=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="star shards"):
        ShardDataset(tmp_path, "empty")
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    with tarfile.open(bad / "a.tar", "w") as tar:
        info = tarfile.TarInfo("0001.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="without a .cls label"):
        ShardDataset(tmp_path / "bad", "train")
    broken = tmp_path / "broken"
    write_shards(folder, broken, "val", samples_per_shard=100)
    with tarfile.open(broken / "val" / "val-000000.tar", "r:") as tar:
        first = next(m for m in tar if m.name.endswith(".jpg"))
    with open(broken / "val" / "val-000000.tar", "r+b") as f:
        f.seek(first.offset_data)
        f.write(b"\0" * 64)  # clobber the JPEG header
    with pytest.raises(CorruptImageError, match="cannot decode sample 0"):
        ShardDataset(broken, "val")[0]


def test_every_folder_image_reaches_the_shards_and_shards_are_never_overwritten(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "shards"
    write_image_folder(root, num_per_class=3, classes=["a", "b"], img_size=8, in_chans=1, seed=0, splits=("train",))
    Image.new("L", (8, 8), 7).save(root / "train" / "a" / "extra.tif")  # a type ImageFolder lists
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    (root / "train" / "b" / "._x.jpg").write_bytes(b"AppleDouble")  # hidden: not an image
    folder = ImageFolder(root, "train")
    assert folder.classes == ["a", "b"] and len(folder) == 7
    write_shards(root, out, "train", samples_per_shard=2)
    assert len(ShardDataset(out, "train")) == 7
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(root, out, "train", samples_per_shard=3)
    with pytest.raises(ValueError, match="skip_corrupt works on image folders"):
        build_dataset(str(out), "train", skip_corrupt=True)
