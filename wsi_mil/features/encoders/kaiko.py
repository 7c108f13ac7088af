"""Kaiko's DINO ViTs (Aben et al., "Towards large-scale training of pathology foundation models", 2024;
timm weights on the hub as ``1aurent/<arch>.kaiko_ai_towards_large_pathology_fms``): ViT-S/16, ViT-S/8,
ViT-B/16, ViT-B/8 at 224 px and ViT-L/14 with 4 registers (a 518-px backbone run at 224 through
``dynamic_img_size``). Their eval transform: Resize((224, 224)) + CenterCrop(224), bilinear; mean and std
0.5 per channel; the model's pooled output (the class token).

Midnight-12k (Karasikov et al., "Training state-of-the-art pathology foundation models with orders of
magnitude less data", arXiv 2504.05186; hf kaiko-ai/midnight): DINOv2 ViT-g/14 with SwiGLU, published
as a transformers ``Dinov2Model`` (converted on load); its card: Resize(224) + CenterCrop(224), mean and
std 0.5; the classification embedding is the class token concatenated with the mean of the patch tokens
(3072-d). 224-px tiles at 0.5 µm/px."""

from __future__ import annotations

from .registry import Preset, Transform, register

KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

for _name, _arch, _img in (("kaiko_vits16", "vit_small_patch16_224", 224), ("kaiko_vits8", "vit_small_patch8_224", 224),
                           ("kaiko_vitb16", "vit_base_patch16_224", 224), ("kaiko_vitb8", "vit_base_patch8_224", 224),
                           ("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", 518)):
    register(Preset(
        _name, _arch, f"hf-hub:1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms",
        {"img_size": _img, "dynamic_img_size": True}, *KAIKO, tile_px=224,
        transform=Transform(224, 224, "bilinear"), precision="fp32",
        citation="Aben et al., arXiv 2404.15217 (kaiko.ai)", licence="see model card",
        note=f"Kaiko {_arch} (timm weights)"))

register(Preset(
    "midnight12k", "vit_giant_patch14_dinov2", None, {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    *KAIKO, tile_px=224, transform=Transform(224, 224, "bilinear"), pool="cls+mean",
    pooling="class token + mean of patch tokens (the card's classification embedding)", precision="fp16",
    formats=("transformers", "timm"), hub_file=("kaiko-ai/midnight", "model.safetensors"),
    citation="Karasikov et al., arXiv 2504.05186 (Midnight)", licence="see model card",
    note="Midnight-12k DINOv2 ViT-g/14 (SwiGLU), published as a transformers Dinov2Model (kaiko-ai/midnight): "
         "its file is fetched and its keys converted to timm's"))
