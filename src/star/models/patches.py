"""Image <-> patch geometry shared by the pretraining model and the classifier."""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed


def check_images(images: torch.Tensor, in_chans: int, img_size: int, leading: Sequence[str],
                 weight_dtype: Optional[torch.dtype] = None, any_size_of_patch: Optional[int] = None) -> None:
    """Fail with a readable message (not deep inside a conv) when images don't fit the model: shape, an empty
    batch, or a dtype the weights cannot take (outside autocast, images must match `weight_dtype`).
    `any_size_of_patch` accepts any height and width divisible by that patch size instead of `img_size`
    (dense features, whose position embedding is interpolated)."""
    size = "H, W" if any_size_of_patch else f"{img_size}, {img_size}"
    shape = f"({', '.join(leading)}, {in_chans}, {size})"
    if images.ndim != len(leading) + 3:
        raise ValueError(f"expected images of shape {shape}, got a {images.ndim}-d tensor {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"expected images of shape {shape}, got an empty tensor {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalized floating-point tensors, got {images.dtype} (convert and "
                         f"normalize them first, e.g. with the data presets' transforms)")
    if (weight_dtype is not None and images.dtype != weight_dtype
            and not torch.is_autocast_enabled(images.device.type)):
        raise ValueError(f"images are {images.dtype} but the model's weights are {weight_dtype}; cast the images "
                         f"(images.to({weight_dtype})) or run under torch.autocast")
    c, h, w = images.shape[-3:]
    if c != in_chans:
        raise ValueError(f"the model expects {in_chans}-channel images, got {c} channels (shape "
                         f"{tuple(images.shape)}); convert the images or build the model with in_chans={c}")
    if any_size_of_patch:
        if h % any_size_of_patch or w % any_size_of_patch or min(h, w) < any_size_of_patch:
            raise ValueError(f"image height and width must be multiples of the patch size {any_size_of_patch}, got "
                             f"{h}x{w}; resize or pad the images")
    elif (h, w) != (img_size, img_size):
        raise ValueError(f"the model expects {img_size}x{img_size} images, got {h}x{w} (shape {tuple(images.shape)}); "
                         f"resize them or build the model with another img_size")


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a grid x grid image, raster order, shape (1, grid*grid, dim)."""
    return build_sincos2d_pos_embed([grid, grid], dim=dim).unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Bicubic interpolation of a (1, g*g, dim) grid embedding to new_grid x new_grid, or to (height, width)
    (e.g. 12x12 -> 14x14). Without antialiasing, as DeiT, MAE and ARM interpolate when fine-tuning, so ARM
    weights start fine-tuning from the same embedding as in ARM's code."""
    size = [new_grid, new_grid] if isinstance(new_grid, int) else list(new_grid)
    return resample_abs_pos_embed(pos_embed, size, num_prefix_tokens=0, antialias=False)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, p*p*C) in raster order, pixels (row, col, channel) inside a patch."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int) -> torch.Tensor:
    """Inverse of `patchify` for square images."""
    n, num, _ = patches.shape
    g, p = int(round(num ** 0.5)), patch_size
    x = patches.reshape(n, g, g, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, in_chans, g * p, g * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized pixels, the regression target: (x - mean) / sqrt(var + eps) over each patch.

    The variance is the unbiased one, as in MAE's and ARM's norm_pix_loss.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def cluster_order(grid: Union[int, Tuple[int, int]], cluster_size: int) -> torch.Tensor:
    """Raster patch indices in STAR's serialization of a grid (or (height, width)) of patches: clusters in
    raster order, patches raster inside each."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if h % cluster_size or w % cluster_size:
        raise ValueError(f"a {h}x{w} patch grid can't be cut into {cluster_size}x{cluster_size} clusters; "
                         f"choose cluster_size dividing {math.gcd(h, w)}")
    idx = torch.arange(h * w).reshape(h // cluster_size, cluster_size, w // cluster_size, cluster_size)
    return idx.permute(0, 2, 1, 3).reshape(-1)
