"""Hibou-B and Hibou-L (Nechaev et al., "Hibou: a family of foundational vision transformers for pathology",
arXiv 2406.05074; hf histai/hibou-b, Apache-2.0, and histai/hibou-L, gated): DINOv2 ViT-B/14 and ViT-L/14
with 4 registers, published as transformers models (the authors' ``Dinov2ModelWithRegisters`` remote code;
its file is converted to timm's ``reg4`` names on load, the class token's position folded into it).
Their image processor: Resize(224, bicubic) + CenterCrop(224), mean (0.7068, 0.5755, 0.722), std
(0.195, 0.2316, 0.1816); the feature is ``pooler_output``, the class token after the final norm.
224-px tiles at 20x (0.5 µm/px)."""

from __future__ import annotations

from .registry import Preset, Transform, register

HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))

for _name, _arch, _repo, _licence in (
        ("hibou_b", "vit_base_patch14_reg4_dinov2", "histai/hibou-b", "Apache-2.0"),
        ("hibou_l", "vit_large_patch14_reg4_dinov2", "histai/hibou-L", "Apache-2.0 (gated)")):
    register(Preset(
        _name, _arch, None, {"img_size": 224, "init_values": 1.0, "dynamic_img_size": True}, *HIBOU,
        tile_px=224, transform=Transform(224, 224, "bicubic"), precision="fp32",
        formats=("transformers", "timm"), hub_file=(_repo, "model.safetensors"),
        citation="Nechaev et al., arXiv 2406.05074 (Hibou)", licence=_licence,
        note=f"{_name.replace('_', '-').title()} DINOv2 ViT with 4 registers, published as a transformers "
             f"model ({_repo}): its file is fetched and its keys converted to timm's"))
