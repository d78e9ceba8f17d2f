"""The fine-tuning model: a 4-direction Vision Mamba classifier, and its construction from a STAR checkpoint.

Tokens are the patches in row-major order with one cls token in the middle. Every layer scans them four
ways (rows forward, rows backward, columns forward, columns backward) and averages. The head pools the mean
of the tokens before the cls token and the mean of those after it (`global_pool="avg"`, or reads the cls
token: "token"), then LayerNorm and a linear layer; `fc_norm=False` LayerNorms every token before pooling
instead, as ARM's fine-tuned models do.
"""

import inspect
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_

from star.models.features import DenseFeaturesMixin, tokens_to_output
from star.models.hub import (PretrainedMixin, constructor_args, load_pretrained, register_architecture,
                             state_dict_mismatches)
from star.models.mamba import build_blocks, no_weight_decay_names, scan_orders
from star.models.patches import check_images, resize_pos_embed, sincos_pos_embed
from star.models.star import StarPretrain

GLOBAL_POOLS = ("avg", "token")


def column_order(grid: Union[int, Tuple[int, int]], cls_pos: int) -> torch.Tensor:
    """Sequence positions visited by a column-major scan of a grid (or (height, width)) of patches, with the
    cls token kept in the middle of that scan (patches after the cls token sit one position later in the
    sequence)."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    patches = torch.arange(h * w).reshape(h, w).t().reshape(-1)
    seq = patches + (patches >= cls_pos).long()
    return torch.cat([seq[:cls_pos], torch.tensor([cls_pos]), seq[cls_pos:]])


def classifier_scan_orders(grid: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
    """The four scan orders (4, h * w + 1) of an h x w patch grid with the cls token in the middle, and its
    position."""
    h, w = grid
    cls_pos = h * w // 2
    rows, columns = torch.arange(h * w + 1), column_order(grid, cls_pos)
    return scan_orders([rows, rows.flip(0), columns, columns.flip(0)]), cls_pos


@register_architecture
class VisionMambaClassifier(PretrainedMixin, DenseFeaturesMixin, nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 drop_path_rate: float = 0.0, scan_impl: str = "auto", global_pool: str = "avg",
                 fc_norm: bool = True, recompute: str = "none"):
        super().__init__()
        self.init_args = constructor_args(VisionMambaClassifier, locals())
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.in_chans = img_size, in_chans
        grid = img_size // patch_size
        if grid < 2:
            raise ValueError(f"a {grid}x{grid} patch grid is too small: the classifier pools the patch tokens on "
                             f"both sides of its middle class token; use img_size >= 2 * patch_size")
        self.cls_pos = grid * grid // 2
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid))
        self.cls_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, embed_dim), std=0.02))
        self.blocks = build_blocks(embed_dim, depth, num_directions=4, d_state=d_state, d_conv=d_conv,
                                   expand=expand, drop_path_rate=drop_path_rate, scan_impl=scan_impl,
                                   recompute=recompute)
        orders, _ = classifier_scan_orders((grid, grid))
        self.register_buffer("scan_orders", orders, persistent=False)  # the 4 directions (see models.mamba)
        # timm's pair: `norm` LayerNorms every token (ARM's norm_f), `fc_norm` the pooled features
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim)
        self.fc_norm = nn.LayerNorm(embed_dim) if fc_norm else nn.Identity()
        self.num_features = embed_dim  # timm: the width the head reads
        self.reset_classifier(num_classes, global_pool)

    def no_weight_decay(self) -> set:
        return no_weight_decay_names(self)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (used for layer-wise lr decay): stem, one group per block, then the head."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                         (r"^fc_norm|^norm\.", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for `num_classes` (0: none, features out), and optionally another pooling, as timm
        models have."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool={global_pool!r}; choose one of {GLOBAL_POOLS} (mean of the tokens on "
                                 f"both sides of the class token, or the class token)")
            self.global_pool = self.init_args["global_pool"] = global_pool
        self.num_classes = self.init_args["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.in_chans, self.img_size, ("batch",), self.patch_embed.proj.weight.dtype)
        x = self._insert_cls(self.patch_embed(images) + self.pos_embed, self.cls_pos)
        for block in self.blocks:
            x = block(x, self.scan_orders)
        return x

    def _insert_cls(self, patches: torch.Tensor, cls_pos: int) -> torch.Tensor:
        return torch.cat([patches[:, :cls_pos], self.cls_token.expand(patches.shape[0], -1, -1),
                          patches[:, cls_pos:]], dim=1)

    def _grid_scan_orders(self, grid: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
        """Scan orders and cls position of another patch grid (dense features), kept for the next call."""
        if self._is_own_grid(grid):
            return self.scan_orders, self.cls_pos
        device = self.scan_orders.device

        def build(g):
            orders, cls_pos = classifier_scan_orders(g)
            return orders.to(device), cls_pos

        return self._for_grid("_grid_orders_cache", grid, (device,), build)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's dense-feature interface: the outputs of blocks `indices` (None: all, n: the last n, or a list)
        as (B, C, H/p, W/p) maps ('NCHW') or (B, H/p*W/p, C) tokens ('NLC'), the cls token left out (with
        `return_prefix_tokens`, each comes as (map, cls token)). Images may have any size divisible by the
        patch. `norm` applies the per-token norm (an identity with fc_norm=True). Returns the intermediates,
        or (final tokens, intermediates)."""
        take, last = self._take_indices(indices)
        patches, grid = self._dense_patches(x)
        orders, cls_pos = self._grid_scan_orders(grid)
        x = self._insert_cls(patches, cls_pos)
        intermediates = []
        for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = block(x, orders)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        cls = [y[:, cls_pos:cls_pos + 1] for y in intermediates]
        maps = tokens_to_output([torch.cat([y[:, :cls_pos], y[:, cls_pos + 1:]], dim=1) for y in intermediates],
                                grid, output_fmt)
        if return_prefix_tokens:
            maps = list(zip(maps, cls))
        return maps if intermediates_only else (self.norm(x), maps)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of `indices` (and the norms and head), for a features-only model."""
        take, last = self._take_indices(indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        m = self.cls_pos
        x = self.norm(x)
        x = x[:, m] if self.global_pool == "token" else (x[:, :m].mean(dim=1) + x[:, m + 1:].mean(dim=1)) / 2
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class TransferReport(NamedTuple):
    missing_keys: List[str]     # classifier weights that start fresh (head, fc_norm; cls_token if none was pretrained)
    unexpected_keys: List[str]  # pretraining weights left behind (decoder, separator, ...)


def classifier_from_pretrain(source: Union[str, Path, StarPretrain, VisionMambaClassifier], **overrides):
    """A classifier initialised from a STAR/ARM pretraining model, or from another classifier (e.g. ARM's
    ImageNet one, to fine-tune it on other classes); a `save_pretrained` folder or the module.

    From a pretraining model the encoder's forward direction seeds all four scan directions and the decoder is
    dropped; from a classifier every weight carries over except a head of another size. The position
    embedding is interpolated to the new grid. `overrides` set classifier arguments (img_size, num_classes,
    drop_path_rate, ...). Returns (model, TransferReport).
    """
    pretrain = load_pretrained(source) if isinstance(source, (str, Path)) else source
    if isinstance(pretrain, VisionMambaClassifier):
        base, seed_directions = dict(pretrain.init_args), False
    elif isinstance(pretrain, StarPretrain):
        encoder_args = [k for k in inspect.signature(VisionMambaClassifier).parameters  # the arguments both take,
                        if k in inspect.signature(StarPretrain).parameters and k != "recompute"]  # but one run's
        base, seed_directions = {k: pretrain.init_args[k] for k in encoder_args}, True
    else:
        where = source if isinstance(source, (str, Path)) else "the model given"
        raise ValueError(f"{where} holds a {type(pretrain).__name__}, not a STAR pretraining model or a classifier")
    model = VisionMambaClassifier(**{**base, **overrides})

    own = model.state_dict()
    state, unused = {}, []
    for key, value in pretrain.state_dict().items():
        if key == "pos_embed":
            state[key] = resize_pos_embed(value, int(own[key].shape[1] ** 0.5))
        elif seed_directions and ".mixer.directions.0." in key:
            for i in range(len(model.blocks[0].mixer.directions)):
                state[key.replace(".directions.0.", f".directions.{i}.")] = value.clone()
        elif key in own and not (key.startswith("head.") and value.shape != own[key].shape):
            state[key] = value
        else:  # decoder, separator, a head for other classes, a norm the new pooling does not use
            unused.append(key)
    mismatched = state_dict_mismatches(model, state)["mismatched"]
    if mismatched:
        raise ValueError("the pretrained encoder does not fit the classifier: " + "; ".join(mismatched))
    missing, unexpected = model.load_state_dict(state, strict=False)
    return model, TransferReport(sorted(missing), sorted(unused + list(unexpected)))
