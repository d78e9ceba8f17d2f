"""timm ergonomics: names registered by `import star` alone (lazily), star's preprocessing in pretrained_cfg,
and `python -m star`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

import star
from star.data import finetune_transform

SRC = Path(__file__).resolve().parents[1] / "src"


def python(code: str = None, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter importing this checkout's star."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def test_import_star_alone_registers_with_timm_without_importing_it():
    result = python(
        "import sys, star\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'import star must stay light'\n"
        "import timm, torch\n"
        "assert 'star.models' not in sys.modules, 'registering must not import the models'\n"
        "net = timm.create_model('star_tiny_patch16_224', features_only=True)\n"
        "maps = net(torch.randn(1, 3, 32, 48))\n"
        "print(len(maps), tuple(maps[-1].shape), type(timm.create_model('star_pretrain_tiny_patch16_192')).__name__)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "(1,", "192,", "2,", "3)", "StarPretrain"]
    # timm imported first, star after: registered at once
    result = python("import timm, star; print(type(timm.create_model('star_base_patch16_224')).__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "VisionMambaClassifier"


def test_python_dash_m_star_and_version():
    result = python(None, "-m", "star", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: star ") and "convert" in result.stdout
    result = python(None, "-m", "star", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"star {star.__version__}"
    result = python(None, "-m", "star", "eval", "/no/such/run")
    assert result.returncode == 2 and "holds no saved model" in result.stderr


@pytest.mark.parametrize("name,size,args", [("star_tiny_patch16_224", 224, {}),
                                            ("star_pretrain_tiny_patch16_192", 32, dict(img_size=32, patch_size=4,
                                                                               in_chans=1, cluster_size=2))])
def test_pretrained_cfg_gives_stars_preprocessing(name, size, args):
    with torch.device("meta"):
        model = timm.create_model(name, **args)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (model.in_chans, size, size)
    preset = {3: ((0.485, 0.456, 0.406), 0.875), 1: ((0.2860,), 1.0)}[model.in_chans]
    assert cfg["mean"] == pytest.approx(preset[0]) and cfg["crop_pct"] == preset[1]
    pixels = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("RGB" if model.in_chans == 3 else "L")
    ours = finetune_transform(size, cfg["mean"], cfg["std"], train=False, crop_pct=preset[1])(image)
    torch.testing.assert_close(timm.data.create_transform(**cfg)(image), ours)
    overlaid = timm.create_model(name, **args, pretrained_cfg_overlay=dict(crop_pct=1.0))
    assert overlaid.pretrained_cfg["crop_pct"] == 1.0


def test_no_released_weights_says_what_to_do():
    with pytest.raises(ValueError, match="star convert arm"):
        timm.create_model("star_base_patch16_224", pretrained=True)
