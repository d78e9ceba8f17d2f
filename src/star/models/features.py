"""Dense features from star's encoders, in timm's `forward_intermediates` / `features_only` form.

Detection and segmentation heads read (B, C, H/p, W/p) maps from chosen blocks at any input size divisible
by the patch. The fixed position embedding is interpolated to the input's grid on the fly and kept for the
next call of the same size (one entry, dropped when the weights change or move).
"""

from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices

from star.models.patches import check_images, resize_pos_embed

Grid = Tuple[int, int]


class DenseFeaturesMixin:
    """For models with `patch_embed`, a (1, g*g, C) `pos_embed`, `blocks`, `img_size` and `in_chans`."""

    @property
    def feature_info(self) -> List[dict]:
        """timm's description of what each block gives: channels and stride (the patch size)."""
        proj = self.patch_embed.proj
        return [dict(module=f"blocks.{i}", num_chs=proj.out_channels, reduction=proj.stride[0])
                for i in range(len(self.blocks))]

    def _dense_patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        """Patch tokens (B, h*w, C) of images of any size divisible by the patch, position embedding added."""
        p = self.patch_embed.proj.stride[0]
        check_images(images, self.in_chans, self.img_size, ("batch",), self.patch_embed.proj.weight.dtype,
                     any_size_of_patch=p)
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # patch_embed itself insists on img_size
        return self.patch_embed.norm(x) + self.grid_pos_embed(grid), grid

    def _is_own_grid(self, grid: Grid) -> bool:
        own = self.img_size // self.patch_embed.proj.stride[0]
        return tuple(grid) == (own, own)

    def _for_grid(self, name: str, grid: Grid, depends_on: tuple, build: Callable[[Grid], Any]) -> Any:
        """`build(grid)` for a grid other than the model's own, kept for the next call: one entry under `name`,
        built again when the grid or anything in `depends_on` (a device, a tensor's version) changes."""
        key = (tuple(grid), *depends_on)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = self.__dict__[name] = (key, build(tuple(grid)))
        return cached[1]

    def grid_pos_embed(self, grid: Grid) -> torch.Tensor:
        """The position embedding of an h x w patch grid: the model's own, or it interpolated (cached)."""
        pos = self.pos_embed
        if self._is_own_grid(grid):
            return pos
        return self._for_grid("_grid_pos_embed_cache", grid, (pos.device, pos.dtype, pos.data_ptr(), pos._version),
                              lambda g: resize_pos_embed(pos, g))

    def _take_indices(self, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
        """timm's block selection: None all blocks, n the last n, a list those (negative from the end)."""
        try:
            return feature_take_indices(len(self.blocks), indices)
        except AssertionError as err:
            raise ValueError(f"indices={indices!r} for a {len(self.blocks)}-block encoder: {err}") from None


def tokens_to_output(tokens: List[torch.Tensor], grid: Grid, output_fmt: str) -> List[torch.Tensor]:
    """Raster-order patch tokens (B, h*w, C) as maps (B, C, h, w) for 'NCHW', or as they are for 'NLC'."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    if output_fmt == "NLC":
        return tokens
    return [t.reshape(t.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for t in tokens]
