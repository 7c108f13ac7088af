"""ResNet-50 truncated after layer 3 (1024-d), the baseline of CLAM (Lu et al., Nat. Biomed. Eng. 2021):
ImageNet weights (torchvision's ``IMAGENET1K_V1``, timm ``resnet50.tv_in1k``), layer4 and the classifier
removed, global average pooling; 256-px tiles at 20x (0.5 µm/px) resized to 224, ImageNet normalisation.
Accepts timm / torchvision ResNet-50 files (``layer4`` and ``fc`` dropped) and CLAM's truncated file."""

from __future__ import annotations

from torch import nn

from .registry import IMAGENET, Preset, Transform, register


def truncate_after_layer3(resnet: nn.Module) -> nn.Module:
    """timm's ResNet with layer4 removed: forward_features ends at layer3, its pooled output is 1024-d."""
    resnet.layer4 = nn.Identity()
    return resnet


register(Preset(
    "resnet50_trunc", "resnet50.tv_in1k", "resnet50.tv_in1k", {}, *IMAGENET, tile_px=256, mpp=0.5,
    transform=Transform(224, 224, "bilinear"), pooling="global average of layer 3", precision="fp16", formats=("timm", "torchvision", "clam"),
    citation="He et al., CVPR 2016; truncation: Lu et al., Nat. Biomed. Eng. 2021 (CLAM)", licence="BSD-3-Clause",
    build=truncate_after_layer3, drop=("layer4.",), note="ImageNet ResNet-50 cut after layer 3, 1024-d"))
