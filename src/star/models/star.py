"""STAR: autoregressive pretraining of a causal Vision Mamba on K images per sequence, with separators.

Data path (one sequence of K images):
    images (B, K, C, H, W) -> patches + sin-cos position -> serialized cluster by cluster
    -> per image [separator (S tokens), cluster 1 .. cluster n]  -> K images concatenated (+ cls at the end)
    -> causal Mamba encoder (1 direction) -> features of 4 depths, LayerNormed, concatenated, projected
    -> 4 cross-attention decoder blocks; the query of cluster j of image k sees only encoder tokens that
       come before that cluster (block-causal mask) -> per-patch normalized pixels, MSE.
K = 1 with separator="none" is ARM. With a separator, the first cluster of every image is a target too.

The decoder window: with "image" (the default) the queries of image k read only image k's own encoder tokens
(its separator and the clusters before the query's), so the K images fold into the batch and one small
(Nt, S + N) mask serves them all: attention work per image is the same at any K, and earlier images still
reach image k through the encoder's state. "sequence" lets them read every earlier token of the sequence
too, with a (K * Nt, L) mask, quadratic in K (kept for ablation). At K = 1 the two are the same model.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, trunc_normal_

from star.models.features import DenseFeaturesMixin, tokens_to_output
from star.models.hub import PretrainedMixin, constructor_args, register_architecture
from star.models.mamba import LayerNorm, build_blocks, no_weight_decay_names
from star.models.patches import (check_images, cluster_order, normalize_patches, patchify, sincos_pos_embed,
                                 unpatchify)

DECODER_WINDOWS = ("image", "sequence")


class ClusterSeparator:
    """STAR's separator: one learned vector repeated to a cluster's length, so that every image opens with a
    unit the size of its clusters and its first cluster is predicted like the others."""

    @staticmethod
    def length(cluster_len: int) -> int:
        return cluster_len

    @staticmethod
    def vector(embed_dim: int, value: float) -> Optional[torch.Tensor]:
        """The separator's vector: a learned `nn.Parameter`, a fixed tensor (kept as a buffer) or None."""
        return nn.Parameter(trunc_normal_(torch.zeros(1, 1, embed_dim), std=0.02))


class TokenSeparator(ClusterSeparator):
    """A single learned token before each image."""

    @staticmethod
    def length(cluster_len: int) -> int:
        return 1


class FixedSeparator(ClusterSeparator):
    """A cluster-long separator of one constant (`separator_value`), not learned."""

    @staticmethod
    def vector(embed_dim: int, value: float) -> Optional[torch.Tensor]:
        return torch.full((1, 1, embed_dim), float(value))


class NoSeparator(ClusterSeparator):
    """Images back to back (ARM at K = 1): an image's first cluster has no context and is not predicted."""

    @staticmethod
    def length(cluster_len: int) -> int:
        return 0

    @staticmethod
    def vector(embed_dim: int, value: float) -> Optional[torch.Tensor]:
        return None


# `--model.separator` names a mode here; a new mode is one class above and one entry
SEPARATORS = {"cluster": ClusterSeparator, "token": TokenSeparator, "fixed": FixedSeparator, "none": NoSeparator}


class SequenceLayout(NamedTuple):
    """Index bookkeeping of a K-image STAR sequence (depends only on K and the geometry)."""
    target_pos: torch.Tensor  # (Nt,) serialized patch positions within an image that are predicted
    mask: torch.Tensor        # bool, query may attend to encoder token: (Nt, S + N) per image, or (K*Nt, L)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries read one level of encoder features) + MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder_dim={dim} must be divisible by decoder_num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q, self.norm_kv = LayerNorm(dim, impl=norm_impl), LayerNorm(dim, impl=norm_impl)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim, impl=norm_impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.num_heads
        query = self.q(self.norm_q(q)).reshape(b, nq, h, d // h).transpose(1, 2)
        key, value = self.kv(self.norm_kv(kv)).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        q = q + self.proj(attn.transpose(1, 2).reshape(b, nq, d))
        return q + self.mlp(self.norm2(q))


def default_feature_layers(depth: int, num_levels: int = 4) -> List[int]:
    """Evenly spaced depths over the upper half of the encoder: 6/8/10/12 of 12, 12/16/20/24 of 24."""
    if num_levels == 1:
        return [depth]
    return [math.floor(depth / 2 + i * depth / (2 * (num_levels - 1)) + 0.5) for i in range(num_levels)]


@register_architecture
class StarPretrain(PretrainedMixin, DenseFeaturesMixin, nn.Module):
    saved_before = {"decoder_window": "sequence"}  # the only window before it was an argument

    def __init__(self, img_size: int = 192, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, d_state: int = 16, d_conv: int = 4, expand: int = 1, cluster_size: int = 4,
                 num_images: int = 4, separator: str = "cluster", separator_value: float = 1.0,
                 cls_token: bool = False, feature_layers: Optional[Sequence[int]] = None, decoder_dim: int = 512,
                 decoder_depth: int = 4, decoder_num_heads: int = 8, decoder_mlp_ratio: float = 4.0,
                 decoder_window: str = "image", scan_impl: str = "auto", recompute: str = "none"):
        super().__init__()
        feature_layers = list(feature_layers or default_feature_layers(depth, decoder_depth))
        self.init_args = constructor_args(StarPretrain, locals())
        if separator not in SEPARATORS:
            raise ValueError(f"separator={separator!r}; choose one of {tuple(SEPARATORS)}")
        if decoder_window not in DECODER_WINDOWS:
            raise ValueError(f"decoder_window={decoder_window!r}; choose one of {DECODER_WINDOWS}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if num_images < 1:
            raise ValueError(f"num_images (K) must be >= 1, got {num_images}")
        if cluster_size < 1 or decoder_depth < 1:
            raise ValueError(f"cluster_size and decoder_depth must be >= 1, got {cluster_size} and {decoder_depth}")
        if len(feature_layers) != decoder_depth or not all(1 <= i <= depth for i in feature_layers):
            raise ValueError(f"feature_layers={feature_layers} must list decoder_depth={decoder_depth} "
                             f"layer numbers in 1..depth={depth}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_images, self.feature_layers, self.decoder_window = num_images, feature_layers, decoder_window
        grid = img_size // patch_size
        self.grid, self.cluster_len = grid, cluster_size ** 2
        self.register_buffer("order", cluster_order(grid, cluster_size), persistent=False)

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid))
        mode = SEPARATORS[separator]  # one vector, repeated: all separator tokens are identical
        self.separator_len, vector = mode.length(self.cluster_len), mode.vector(embed_dim, separator_value)
        if isinstance(vector, nn.Parameter):
            self.separator = vector
        elif vector is not None:
            self.register_buffer("separator", vector)
        self.cls_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, embed_dim), std=0.02)) if cls_token else None
        self.blocks = build_blocks(embed_dim, depth, num_directions=1, d_state=d_state, d_conv=d_conv,
                                   expand=expand, scan_impl=scan_impl, recompute=recompute)

        # decoder
        self.feature_norms = nn.ModuleList(LayerNorm(embed_dim, impl=scan_impl) for _ in feature_layers)
        self.feature_proj = nn.Linear(len(feature_layers) * embed_dim, decoder_depth * decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid)[:, self.order],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(decoder_dim, decoder_num_heads, decoder_mlp_ratio, norm_impl=scan_impl)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_dim, impl=scan_impl)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        self._init_decoder()
        # the layout of the model's own K, as buffers: they follow .to(device), and torch.compile traces no
        # cache being filled (which made it compile the training step twice)
        target_pos, mask = self._build_layout(num_images)
        if len(target_pos) == 0:
            raise ValueError(f"nothing to predict: one {cluster_size}x{cluster_size}-patch cluster per image and "
                             f"separator='none' leave no cluster with context; use a smaller cluster_size or a "
                             f"separator")
        self.register_buffer("layout_target_pos", target_pos, persistent=False)
        self.register_buffer("layout_mask", mask, persistent=False)

    def _init_decoder(self):
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.feature_proj, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        return no_weight_decay_names(self)

    def _build_layout(self, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets and the block-causal mask for K images. Every token carries a 'unit' number (a separator
        or a cluster); the query predicting unit u may only read encoder tokens of units < u. The "image"
        window's mask is the one of a single image, without the cls token (no query reads it)."""
        n, t, s = self.grid ** 2, self.cluster_len, self.separator_len
        image_window = self.decoder_window == "image"
        num_images = 1 if image_window else num_images
        units_per_image = n // t + 1  # the separator (present or not) and the clusters
        image_units = torch.cat([torch.zeros(s, dtype=torch.long), 1 + torch.arange(n) // t])
        token_units = torch.cat([k * units_per_image + image_units for k in range(num_images)]
                                + ([torch.tensor([num_images * units_per_image])]
                                   if self.cls_token is not None and not image_window else []))
        target_pos = torch.arange(n) if s else torch.arange(t, n)
        query_units = torch.cat([k * units_per_image + 1 + target_pos // t for k in range(num_images)])
        return target_pos, token_units[None, :] < query_units[:, None]

    def layout(self, num_images: int) -> SequenceLayout:
        """The layout for K images: the model's own K (any K for the "image" window) from its buffers, any other
        K built on the spot."""
        if num_images == self.num_images or self.decoder_window == "image":
            return SequenceLayout(self.layout_target_pos, self.layout_mask)
        target_pos, mask = self._build_layout(num_images)
        return SequenceLayout(target_pos.to(self.pos_embed.device), mask.to(self.pos_embed.device))

    def build_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) -> STAR token sequence (B, L, D): [separator, clusters] per image (+ cls)."""
        b, k = images.shape[:2]
        x = self.patch_embed(images.flatten(0, 1)) + self.pos_embed
        x = self._open_with_separator(x[:, self.order]).reshape(b, -1, x.shape[-1])
        if self.cls_token is not None:  # at the very end: nothing reads it in pretraining, it is kept for transfer
            x = torch.cat([x, self.cls_token.expand(b, -1, -1)], dim=1)
        return x

    def _open_with_separator(self, images: torch.Tensor) -> torch.Tensor:
        """(N, n, D) serialized images -> (N, S + n, D), each opened by the separator's S tokens."""
        if not self.separator_len:
            return images
        return torch.cat([self.separator.to(images.dtype).expand(images.shape[0], self.separator_len, -1), images], 1)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Run the causal encoder; return the outputs of `feature_layers` (1-based)."""
        outputs = {}
        for i, block in enumerate(self.blocks[:max(self.feature_layers)], start=1):
            x = block(x)
            outputs[i] = x
        return [outputs[i] for i in self.feature_layers]

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's dense-feature interface on the causal encoder. Each image (B, C, H, W) is one sequence,
        read as in pretraining (separator, then the patches cluster by cluster); the outputs of blocks
        `indices` (None: all, n: the last n, or a list) come back in raster order as (B, C, H/p, W/p) maps
        ('NCHW') or (B, H/p*W/p, C) tokens ('NLC'); with `return_prefix_tokens` each comes with the
        separator's outputs. Any image size works whose patch grid the clusters tile. Returns the
        intermediates, or (the last block's output in sequence order, intermediates)."""
        if norm:
            raise ValueError("the causal encoder has no final norm to apply (the decoder norms each feature level)")
        take, last = self._take_indices(indices)
        patches, grid = self._dense_patches(x)
        order = self._grid_cluster_order(grid)
        x, s = self._open_with_separator(patches[:, order]), self.separator_len
        inverse = order.argsort()
        intermediates, prefixes = [], []
        for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = block(x)
            if i in take:
                intermediates.append(x[:, s:][:, inverse])
                prefixes.append(x[:, :s])
        maps = tokens_to_output(intermediates, grid, output_fmt)
        if return_prefix_tokens and s:
            maps = list(zip(maps, prefixes))
        return maps if intermediates_only else (x, maps)

    def _grid_cluster_order(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The serialization of another patch grid (dense features), kept for the next call."""
        if self._is_own_grid(grid):
            return self.order
        device = self.order.device
        return self._for_grid("_grid_order_cache", grid, (device,),
                              lambda g: cluster_order(g, self.init_args["cluster_size"]).to(device))

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of `indices` and, with `prune_head`, the decoder (every module and
        parameter the encoder does not use), for a features-only model. There is no final norm to prune."""
        take, last = self._take_indices(indices)
        self.blocks = self.blocks[:last + 1]
        if prune_head:
            for name in [n for n, _ in self.named_children() if n not in ("patch_embed", "blocks")]:
                delattr(self, name)
            for name in [n for n, _ in self.named_parameters(recurse=False) if n not in ("separator", "cls_token")]:
                delattr(self, name)
        return take

    def forward_decoder(self, features: List[torch.Tensor], num_images: int) -> torch.Tensor:
        layout = self.layout(num_images)
        levels = torch.cat([norm(f) for norm, f in zip(self.feature_norms, features)], dim=-1)
        keys = self.feature_proj(levels).chunk(len(self.decoder_blocks), dim=-1)
        b = features[0].shape[0]
        q = self.mask_token + self.decoder_pos_embed[:, layout.target_pos]
        if self.decoder_window == "image":  # images fold into the batch: (B * K, S + N) keys per image
            image_len = self.separator_len + self.grid ** 2
            keys = [kv[:, :num_images * image_len].reshape(b * num_images, image_len, -1) for kv in keys]
            q = q.expand(b * num_images, -1, -1)
        else:
            q = q.repeat(1, num_images, 1).expand(b, -1, -1)
        for block, kv in zip(self.decoder_blocks, keys):
            q = block(q, kv, layout.mask)
        return self.decoder_pred(self.decoder_norm(q))  # (B * K, Nt, P) or (B, K * Nt, P)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch normalized pixels of the predicted patches, (B, K, Nt, p*p*C), in serialized order."""
        b, k = images.shape[:2]
        patches = patchify(images.flatten(0, 1).float(), self.patch_size)[:, self.order]
        target_pos = self.layout(k).target_pos
        return normalize_patches(patches[:, target_pos]).reshape(b, k, len(target_pos), -1)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_images(images, self.in_chans, self.img_size, ("batch", "images per sequence"),
                     self.patch_embed.proj.weight.dtype)
        b, k = images.shape[:2]
        pred = self.forward_decoder(self.forward_features(self.build_sequence(images)), k)
        pred = pred.float().reshape(b, k, -1, pred.shape[-1])
        target = self.targets(images)
        loss = (pred - target).pow(2).mean()
        return {"loss": loss, "pred": pred, "target": target}

    @torch.no_grad()
    def predict_images(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's next-cluster predictions drawn as images (B, K, C, H, W): each predicted patch is put back
        in pixel space with the mean/std of the real patch (as MAE shows its reconstructions); patches that are
        never predicted (the first cluster without a separator) are left at 0. `predicted` marks those drawn."""
        b, k = images.shape[:2]
        out = self.forward(images)
        patches = patchify(images.flatten(0, 1).float(), self.patch_size)
        target_raster = self.order[self.layout(k).target_pos]
        real = patches[:, target_raster]
        mean, std = real.mean(-1, keepdim=True), (real.var(-1, keepdim=True) + 1e-6) ** 0.5
        canvas = torch.zeros_like(patches)
        canvas[:, target_raster] = out["pred"].flatten(0, 1) * std + mean
        drawn = torch.zeros_like(patches)
        drawn[:, target_raster] = 1.0
        shape = (b, k, self.in_chans, self.img_size, self.img_size)
        return {"images": unpatchify(canvas, self.patch_size, self.in_chans).reshape(shape),
                "predicted": unpatchify(drawn, self.patch_size, self.in_chans).reshape(shape) > 0,
                "loss": out["loss"]}
