"""The fine-tuning model: a 4-direction Vision Mamba classifier, and its construction from a STAR checkpoint.

Tokens are the patches in row-major order with one cls token in the middle. Every layer scans them four
ways (rows forward, rows backward, columns forward, columns backward) and averages. The head pools the mean
of the tokens before the cls token and the mean of those after it, then LayerNorm and a linear layer.
"""

from pathlib import Path
from typing import List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_

from star.models.hub import PretrainedMixin, load_pretrained, register_architecture, state_dict_mismatches
from star.models.mamba import ScanOrders, build_blocks, no_weight_decay_names, scan_orders
from star.models.patches import check_images, resize_pos_embed, sincos_pos_embed
from star.models.star import StarPretrain


def column_order(grid: int, cls_pos: int) -> torch.Tensor:
    """Sequence positions visited by a column-major scan of the patches, with the cls token kept in the
    middle of that scan (patches after the cls token sit one position later in the sequence)."""
    patches = torch.arange(grid * grid).reshape(grid, grid).t().reshape(-1)
    seq = patches + (patches >= cls_pos).long()
    return torch.cat([seq[:cls_pos], torch.tensor([cls_pos]), seq[cls_pos:]])


@register_architecture
class VisionMambaClassifier(PretrainedMixin, nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 drop_path_rate: float = 0.0, scan_impl: str = "auto"):
        super().__init__()
        self.init_args = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand,
                              drop_path_rate=drop_path_rate, scan_impl=scan_impl)
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
                                   expand=expand, drop_path_rate=drop_path_rate, scan_impl=scan_impl)
        rows, columns = torch.arange(grid * grid + 1), column_order(grid, self.cls_pos)
        index, inverse = scan_orders([rows, rows.flip(0), columns, columns.flip(0)])
        self.register_buffer("scan_index", index, persistent=False)  # the 4 directions (see models.mamba)
        self.register_buffer("scan_inverse", inverse, persistent=False)
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.num_features = embed_dim  # timm: the width the head reads
        self.reset_classifier(num_classes)

    def no_weight_decay(self) -> set:
        return no_weight_decay_names(self)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (used for layer-wise lr decay): stem, one group per block, then the head."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                         (r"^fc_norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for `num_classes` (0: none, features out), as timm models have; pooling is fixed."""
        if global_pool is not None:
            raise ValueError("the classifier's pooling is fixed (mean of the tokens on both sides of the class token)")
        self.num_classes = self.init_args["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.in_chans, self.img_size, ("batch",), self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(images) + self.pos_embed
        b, m = x.shape[0], self.cls_pos
        x = torch.cat([x[:, :m], self.cls_token.expand(b, -1, -1), x[:, m:]], dim=1)
        orders = ScanOrders(self.scan_index, self.scan_inverse)
        for block in self.blocks:
            x = block(x, orders)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        m = self.cls_pos
        x = self.fc_norm((x[:, :m].mean(dim=1) + x[:, m + 1:].mean(dim=1)) / 2)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class TransferReport(NamedTuple):
    missing_keys: List[str]     # classifier weights that start fresh (head, fc_norm; cls_token if none was pretrained)
    unexpected_keys: List[str]  # pretraining weights left behind (decoder, separator, ...)


def classifier_from_pretrain(source: Union[str, Path, StarPretrain], **overrides):
    """A classifier initialised from a STAR/ARM pretraining model (a `save_pretrained` folder or the module).

    The encoder's forward direction seeds all four scan directions, the position embedding is interpolated
    to the new grid, and the decoder is dropped. `overrides` set classifier arguments (img_size, num_classes,
    drop_path_rate, ...). Returns (model, TransferReport).
    """
    pretrain = load_pretrained(source) if isinstance(source, (str, Path)) else source
    if not isinstance(pretrain, StarPretrain):
        where = source if isinstance(source, (str, Path)) else "the model given"
        raise ValueError(f"{where} holds a {type(pretrain).__name__}, not a STAR pretraining model")
    encoder_args = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "d_state", "d_conv", "expand",
                    "scan_impl")
    model = VisionMambaClassifier(**{**{k: pretrain.init_args[k] for k in encoder_args}, **overrides})

    own = model.state_dict()
    state, unused = {}, []
    for key, value in pretrain.state_dict().items():
        if key == "pos_embed":
            state[key] = resize_pos_embed(value, int(own[key].shape[1] ** 0.5))
        elif ".mixer.directions.0." in key:
            for i in range(len(model.blocks[0].mixer.directions)):
                state[key.replace(".directions.0.", f".directions.{i}.")] = value.clone()
        elif key in own:
            state[key] = value
        else:
            unused.append(key)
    mismatched = state_dict_mismatches(model, state)["mismatched"]
    if mismatched:
        raise ValueError("the pretrained encoder does not fit the classifier: " + "; ".join(mismatched))
    missing, unexpected = model.load_state_dict(state, strict=False)
    return model, TransferReport(sorted(missing), sorted(unused + list(unexpected)))
