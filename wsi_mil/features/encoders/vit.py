"""Pathology ViTs loadable with timm, each restated from its model card (architecture kwargs, transform,
pooling). All take tiles at 20x (0.5 µm/px); the hub repositories are gated (accept the licence, log in).

- UNI (Chen et al., Nat. Med. 2024; hf MahmoodLab/UNI, CC-BY-NC-ND-4.0): ViT-L/16, LayerScale 1e-5;
  Resize(224) + CenterCrop(224), bilinear; ImageNet normalisation; the class token.
- UNI2-h (hf MahmoodLab/UNI2-h, CC-BY-NC-ND-4.0): ViT-H/14 with 8 registers, SwiGLU, no class position
  embedding; same transform as UNI.
- H-optimus-0 / H-optimus-1 (Bioptimus; hf bioptimus/H-optimus-0, -1): ViT-g/14 with 4 registers
  (DINOv2), 224-px tiles at 0.5 µm/px, no resize; their own normalisation; the class token.
- Virchow / Virchow2 (Vorontsov et al., Nat. Med. 2024; Zimmermann et al. 2024; hf paige-ai/Virchow,
  paige-ai/Virchow2, CC-BY-NC-ND-4.0): ViT-H/14, SwiGLU, mlp_ratio 5.3375 (Virchow2 with 4 registers);
  Resize(224, bicubic); the class token concatenated with the mean of the patch tokens (2560-d).
- Prov-GigaPath (Xu et al., Nature 2024; hf prov-gigapath/prov-gigapath, Apache-2.0): ViT-g/16;
  Resize(256, bicubic) + CenterCrop(224) of a 256-px tile; the class token.
- Phikon-v2 (Filiot et al., arXiv 2409.09173; hf owkin/phikon-v2, Owkin non-commercial): DINOv2 ViT-L/16,
  no registers, published as a transformers ``Dinov2Model`` (converted on load); 224-px tiles at
  0.5 µm/px, Resize(224) + CenterCrop(224), ImageNet normalisation; ``last_hidden_state[:, 0]``.
- GPFM (Ma et al. 2024, "Towards a generalizable pathology foundation model via unified knowledge
  distillation"; hf majiabo/GPFM): DINOv2 ViT-L/14, LayerScale 1e-5, its ``GPFM.pth`` loaded into timm's
  ``vit_large_patch14_dinov2``; Resize((224, 224)) bicubic; ImageNet normalisation; the class token.
- Phikon (Filiot et al. 2023; hf owkin/phikon, Owkin non-commercial): iBOT ViT-B/16 published as a
  transformers ViTModel (converted to timm keys on load; LayerNorm eps 1e-12); Resize(224) bilinear;
  ``last_hidden_state[:, 0]``.
- Virchow2 (class token): the same model, the class token alone (1280-d), as PRISM2 and TRIDENT's
  ``virchow2-cls`` consume it; its features never share a folder with ``virchow2``'s.
- H0-mini (Filiot et al., arXiv 2501.16239; hf bioptimus/H0-mini, CC-BY-NC-ND-4.0): ViT-B/14 with 4
  registers and SwiGLU (the card passes ``SwiGLUPacked`` / ``SiLU`` to timm), distilled from H-optimus-0;
  the MLP ratio is H-optimus' 2.66667 x 2 (fc1 4096-d), which gives the 86 M parameters the paper states
  (the hub's timm config carries it; timm's ``vit_base`` default of 4 would give 72 M);
  timm's data config of the hub (224 px, bicubic, crop 1.0, H-optimus normalisation); the class token
  concatenated with the mean of the patch tokens after the registers (1536-d), as Bioptimus' SDK
  specifies (``cls+patch_mean``).
- Lunit DINO ViT-S/8 (Kang et al., CVPR 2023; timm weights 1aurent/vit_small_patch8_224.lunit_dino,
  Lunit non-commercial): 224-px tiles, Lunit's normalisation (their benchmark-ssl README); the class token.
- Prov-GigaPath-Flash (hf prov-gigapath/prov-gigapath-flash): the DINOv2 ViT-S/16 tile encoder with SwiGLU
  (fc1 2048-d) and LayerScale; GigaPath's transform, Resize(256, bicubic) + CenterCrop(224); the class token.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from .registry import IMAGENET, Preset, Transform, register

LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
UNI_T = Transform(224, 224, "bilinear")

register(Preset(
    "uni", "vit_large_patch16_224", "hf-hub:MahmoodLab/uni",
    {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, *IMAGENET,
    tile_px=224, transform=UNI_T, citation="Chen et al., Nat. Med. 2024 (UNI)", licence="CC-BY-NC-ND-4.0",
    note="UNI ViT-L/16 (gated on the hub: accept the licence, log in)"))
register(Preset(
    "uni2_h", "vit_giant_patch14_224", "hf-hub:MahmoodLab/UNI2-h",
    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
     "_swiglu": True}, *IMAGENET,
    tile_px=224, transform=UNI_T, precision="bf16", citation="Chen et al., Nat. Med. 2024 (UNI2-h model card)",
    licence="CC-BY-NC-ND-4.0", note="UNI2-h ViT-H/14 with registers (gated)"))
for _name, _hub, _cite in (("h_optimus_0", "hf-hub:bioptimus/H-optimus-0", "Saillard et al. 2024 (H-optimus-0)"),
                           ("h_optimus_1", "hf-hub:bioptimus/H-optimus-1", "Bioptimus 2025 (H-optimus-1)")):
    register(Preset(
        _name, "vit_giant_patch14_reg4_dinov2", _hub,
        {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False}, *HOPTIMUS,
        tile_px=224, transform=Transform(224, 224, "bilinear"), citation=_cite,
        licence="Apache-2.0" if _name == "h_optimus_0" else "academic research (model card)",
        note=f"{_name.replace('_', '-').replace('h-optimus', 'H-optimus')} ViT-g/14 (gated)"))
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            "_swiglu": True}
register(Preset(
    "virchow", "vit_huge_patch14_224", "hf-hub:paige-ai/Virchow", dict(_VIRCHOW), *IMAGENET,
    tile_px=224, transform=Transform(224, 224, "bicubic"), pool="cls+mean", pooling="class token + mean patch token",
    citation="Vorontsov et al., Nat. Med. 2024 (Virchow)", licence="Apache-2.0",
    note="Virchow ViT-H/14, class token + mean patch token (gated)"))
register(Preset(
    "virchow2", "vit_huge_patch14_224", "hf-hub:paige-ai/Virchow2", {**_VIRCHOW, "reg_tokens": 4}, *IMAGENET,
    tile_px=224, transform=Transform(224, 224, "bicubic"), pool="cls+mean", pooling="class token + mean of patch tokens (registers left out)",
    citation="Zimmermann et al. 2024 (Virchow2)", licence="CC-BY-NC-ND-4.0",
    note="Virchow2 ViT-H/14 with 4 registers, class token + mean patch token (gated)"))
register(Preset(
    "gigapath", "vit_giant_patch14_dinov2", "hf-hub:prov-gigapath/prov-gigapath",
    {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5,
     "mlp_ratio": 5.33334}, *IMAGENET,
    tile_px=256, transform=Transform(256, 224, "bicubic"), citation="Xu et al., Nature 2024 (Prov-GigaPath)",
    licence="Apache-2.0", note="Prov-GigaPath tile encoder ViT-g/16 (gated)"))
register(Preset(
    "phikon", "vit_base_patch16_224", None,
    {"img_size": 224, "norm_layer": partial(nn.LayerNorm, eps=1e-12)}, *IMAGENET,
    tile_px=224, transform=Transform(224, 224, "bilinear"), precision="fp32", formats=("transformers", "timm"),
    hub_file=("owkin/phikon", "pytorch_model.bin"),
    citation="Filiot et al., medRxiv 2023 (Phikon)", licence="Owkin non-commercial",
    note="Phikon iBOT ViT-B/16, published as a transformers ViTModel (owkin/phikon): its file is fetched and "
         "its keys converted to timm's"))
register(Preset(
    "gpfm", "vit_large_patch14_dinov2", None, {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    *IMAGENET, tile_px=224, transform=Transform(224, 224, "bicubic"), hub_file=("majiabo/GPFM", "GPFM.pth"),
    citation="Ma et al., arXiv 2407.18449 (GPFM)", licence="see model card",
    note="GPFM DINOv2 ViT-L/14 (its GPFM.pth is fetched from majiabo/GPFM)"))
register(Preset(
    "phikon_v2", "vit_large_patch16_224", None, {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    *IMAGENET, tile_px=224, transform=Transform(224, 224, "bilinear"), precision="fp32",
    formats=("transformers", "timm"), hub_file=("owkin/phikon-v2", "model.safetensors"),
    citation="Filiot et al., arXiv 2409.09173 (Phikon-v2)", licence="Owkin non-commercial",
    note="Phikon-v2 DINOv2 ViT-L/16, published as a transformers Dinov2Model (owkin/phikon-v2): its file is "
         "fetched and its keys converted to timm's"))
register(Preset(
    "virchow2_cls", "vit_huge_patch14_224", "hf-hub:paige-ai/Virchow2", {**_VIRCHOW, "reg_tokens": 4,
                                                                        "global_pool": "token"}, *IMAGENET,
    tile_px=224, transform=Transform(224, 224, "bicubic"), pooling="class token only (1280-d)",
    citation="Zimmermann et al. 2024 (Virchow2)", licence="CC-BY-NC-ND-4.0",
    note="Virchow2 ViT-H/14, the class token alone, as slide encoders such as PRISM2 consume it (gated)"))
register(Preset(
    "h0_mini", "vit_base_patch14_reg4_dinov2", "hf-hub:bioptimus/H0-mini",
    {"img_size": 224, "mlp_ratio": 2.66667 * 2, "global_pool": "", "dynamic_img_size": True, "_swiglu": True},
    *HOPTIMUS,
    tile_px=224, transform=Transform(224, 224, "bicubic"), pool="cls+mean",
    pooling="class token + mean of patch tokens (registers left out)",
    citation="Filiot et al., arXiv 2501.16239 (H0-mini)", licence="CC-BY-NC-ND-4.0",
    note="H0-mini ViT-B/14 with 4 registers, distilled from H-optimus-0 (gated)"))
register(Preset(
    "lunit_vits8", "vit_small_patch8_224", "hf-hub:1aurent/vit_small_patch8_224.lunit_dino",
    {"img_size": 224, "dynamic_img_size": True}, *LUNIT, tile_px=224, transform=Transform(224, 224, "bicubic"),
    precision="fp32", citation="Kang et al., CVPR 2023 (Benchmarking self-supervised learning on diverse "
                               "pathology datasets)", licence="Lunit non-commercial",
    note="Lunit DINO ViT-S/8 (timm weights)"))
register(Preset(
    "gigapath_flash", "vit_small_patch16_224", None,
    {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2048 / 384, "dynamic_img_size": True, "_swiglu": True},
    *IMAGENET, tile_px=256, transform=Transform(256, 224, "bicubic"),
    hub_file=("prov-gigapath/prov-gigapath-flash", "pytorch_model.bin"),
    citation="Prov-GigaPath-Flash model card (Xu et al., Nature 2024 family)", licence="see model card",
    note="Prov-GigaPath-Flash tile encoder ViT-S/16 with SwiGLU (its pytorch_model.bin is fetched; gated)"))
