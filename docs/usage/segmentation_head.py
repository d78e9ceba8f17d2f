"""A small segmentation head on star's dense features (docs/usage.md): 1x1 convolutions of four blocks' maps,
summed, classified per position and upsampled to the image."""

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import star  # noqa: F401 (registers star's names with timm)


class SegmentationHead(nn.Module):
    def __init__(self, channels, num_classes: int, width: int = 128):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps, size):
        x = sum(proj(m) for proj, m in zip(self.proj, maps))
        return F.interpolate(self.classify(F.gelu(x)), size=size, mode="bilinear", align_corners=False)


backbone = timm.create_model("star_tiny_patch16_224", features_only=True, out_indices=(2, 5, 8, 11)).eval()
head = SegmentationHead(backbone.feature_info.channels(), num_classes=21)
images = torch.randn(2, 3, 320, 480)  # any size divisible by 16
with torch.no_grad():
    maps = backbone(images)
    logits = head(maps, images.shape[-2:])
print("maps:", [tuple(m.shape) for m in maps], "strides", backbone.feature_info.reduction())
print("per-pixel logits:", tuple(logits.shape))
