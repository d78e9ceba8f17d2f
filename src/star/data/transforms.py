"""Transform builders (torchvision / timm) and the recipe presets for each dataset.

All builders work for 1-channel ("L") and 3-channel images: pass a mean/std of matching length.
timm's RandAugment derives its fill colour from `mean`, so 1-channel stats give a 1-value fill, which
PIL accepts for "L" images.
"""

from dataclasses import dataclass

import timm.data
import timm.data.auto_augment
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD
# Pixel mean / std over all 60000 x 28 x 28 training pixels scaled to [0, 1] (float64), computed once
# from train-images-idx3-ubyte.gz: 0.2860406, 0.3530242.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class DataPreset:
    """Recipe values for one dataset; the training layer copies them into its config defaults."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrain_img_size: int
    finetune_img_size: int
    pretrain_scale: tuple[float, float]
    auto_augment: str | None
    re_prob: float
    crop_pct: float


PRESETS = {
    # ARM/STAR ImageNet recipe: pretrain at 192 px, fine-tune at 224 with RandAugment, eval resize 256 + crop 224.
    "imagenet": DataPreset(IMAGENET_MEAN, IMAGENET_STD, 192, 224, (0.2, 1.0), "rand-m9-mstd0.5-inc1", 0.25, 224 / 256),
    # Small grayscale images (28 px upscaled to the model's 32 px): milder crops and augmentation, since a
    # 0.2-scale crop of a 28 px garment leaves too little of it; no centre crop at eval.
    "small-grayscale": DataPreset(FASHION_MNIST_MEAN, FASHION_MNIST_STD, 32, 32, (0.6, 1.0), "rand-m5-mstd0.5-inc1", 0.0, 1.0),
}

_INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                   "nearest": T.InterpolationMode.NEAREST}


def pretrain_transform(img_size, mean, std, scale=(0.2, 1.0), hflip=True, interpolation="bicubic"):
    """ARM/STAR pretraining augmentation: RandomResizedCrop + horizontal flip, nothing else."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    steps = [T.RandomResizedCrop(img_size, scale=scale, interpolation=_INTERPOLATIONS[interpolation])]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _posterize_allow_zero_bits(img, bits_to_keep, **_):
    """timm's posterize, but 0 bits gives the black image older Pillow produced (Pillow 13 raises).

    timm's PosterizeIncreasing reaches 0 bits whenever RandAugment's sampled magnitude hits its cap of
    10, which with rand-m9-mstd0.5 happens on a few images in a thousand: enough to crash every epoch.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm.data.auto_augment.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if op.aug_fn is timm.data.auto_augment.posterize:
                op.aug_fn = _posterize_allow_zero_bits


def finetune_transform(img_size, mean, std, train, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                       crop_pct=224 / 256, interpolation="bicubic", scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                       crop_mode="center"):
    """Fine-tuning transform via timm.data.create_transform (DeiT/MAE recipe).

    train: RandomResizedCrop(scale) + flip + RandAugment (or colour jitter when auto_augment is None)
    + ToTensor + Normalize + random erasing. eval: resize the shorter side ("center"), or the image to a
    square ("squash", as ARM evaluates), to img_size / crop_pct, then centre crop img_size.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have one value per channel, got {mean} and {std}")
    transform = timm.data.create_transform(
        input_size=img_size,
        is_training=train,
        auto_augment=auto_augment,
        re_prob=re_prob,
        crop_pct=crop_pct,
        interpolation=interpolation,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
        mean=tuple(mean),
        std=tuple(std),
        crop_mode=crop_mode,
    )
    _patch_posterize(transform)
    return transform


def build_mixup(mixup, cutmix, label_smoothing, num_classes):
    """timm Mixup/CutMix (which also applies label smoothing), or None when both alphas are 0.

    With None the training loop uses plain (optionally label-smoothed) cross-entropy on int labels.
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    return timm.data.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                           num_classes=num_classes)
