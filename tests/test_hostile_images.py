"""Hostile image files in a run's data: decompression bombs and class folders without images fail naming the
file, or are skipped and counted with --data.skip_corrupt, in training, eval and predict alike."""

import struct
import zlib

import pytest
from PIL import Image

from star.data import write_image_folder
from test_cli import star
from test_faults import FINE, messages

def write_bomb(path, side: int) -> None:
    """A PNG of a few bytes whose header claims side x side pixels (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


# 8 + 8 images of 16 px per split: 2 steps of 8, validated on the val split
FOLDER_JOB = [*FINE, "--model.num_classes", 2, "--data.val_size", 0, "--optim.batch_size", 8, "--optim.epochs", 1]


@pytest.fixture
def hostile_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", num_per_class=8, classes=["a", "b"], img_size=16, in_chans=1)
    write_bomb(root / "train" / "a" / "bomb.png", 20000)  # past twice PIL's limit: PIL raises
    write_bomb(root / "val" / "b" / "bomb.png", 10000)  # past the limit, not twice: PIL only warns
    return root


def test_decompression_bombs_are_skipped_or_named(hostile_folder, tmp_path, capsys):
    job = [*FOLDER_JOB, "--data.dataset", hostile_folder]
    assert star(*job, "--output_dir", tmp_path / "strict") == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and str(hostile_folder / "train" / "a" / "bomb.png") in err and "pixels" in err
    run = tmp_path / "skip"
    assert star(*job, "--data.skip_corrupt", "true", "--output_dir", run) == 0
    # the validation split's bad file is counted too (it used to be the training split's only)
    assert "skipped 2 corrupt image files (--data.skip_corrupt): 1 in training, 1 in validation" in capsys.readouterr().out
    # eval leaves the bad file out instead of counting the image that took its place
    assert star("eval", run, "--split", "val", "--device", "cpu") == 0
    assert "val: 16 images (1 unreadable files skipped, --data.skip_corrupt), top-1" in capsys.readouterr().out
    assert star("eval", run, "--split", "val", "--device", "cpu", "--data.skip_corrupt", "false") == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and str(hostile_folder / "val" / "b" / "bomb.png") in err
    # predict answers for the good files and names the bad one
    good = hostile_folder / "val" / "a" / "00000.jpg"
    assert star("predict", run, good, hostile_folder / "val" / "b" / "bomb.png", "--device", "cpu") == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and captured.out.count("\n") == 1
    assert len(messages(captured.err)) == 1 and "bomb.png" in captured.err and "pixels" in captured.err


def test_an_empty_class_folder_is_an_error(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", num_per_class=8, classes=["a", "b"], img_size=16, in_chans=1)
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / ".DS_Store").write_bytes(b"")  # not an image
    assert star(*FOLDER_JOB, "--data.dataset", root, "--output_dir", tmp_path / "run") == 2
    assert f"class folders without images under {root / 'train'}: ['c']" in capsys.readouterr().err
