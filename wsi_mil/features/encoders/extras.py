"""Encoders that only their authors' package can build: optional extras, listed apart from the presets.

Their code is not on PyPI (CONCH v1 is a modified open_clip; MUSK a BEiT-3 variant with its own timm
registrations), so the conformance test cannot restate their recipe without it; they are not counted
among the conformant presets. Naming one without its package installed is one line saying what to install.

- CONCH v1 (Lu et al., Nat. Med. 2024; hf MahmoodLab/conch, CC-BY-NC-ND-4.0): ``conch_ViT-B-16`` from the
  ``conch`` package; ``encode_image(x, proj_contrast=False, normalize=False)`` (512-d); its preprocess:
  Resize(448, bicubic) + CenterCrop(448), OpenAI CLIP normalisation; 512-px tiles at 20x, as TRIDENT reads it.
- MUSK (Xiang et al., Nature 2025; hf xiangjx/musk, CC-BY-NC-ND-4.0): ``musk_large_patch16_384`` from the
  ``musk`` package; the vision class token without projection or normalisation (1024-d); Resize(384,
  bicubic) + CenterCrop(384), Inception normalisation (0.5).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from .registry import Preset, Transform
from .weights import EncoderError

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
EXTRAS: dict[str, tuple[Preset, str, str]] = {}  # name -> (recipe, package module, how to install it)


class _ConchV1(nn.Module):
    def __init__(self, weights: Path | None):
        super().__init__()
        from conch.open_clip_custom import create_model_from_pretrained

        self.model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(weights or
                                                                                           "hf_hub:MahmoodLab/conch"))

    def forward(self, x):
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


class _Musk(nn.Module):
    def __init__(self, weights: Path | None):
        super().__init__()
        import timm
        from musk import modeling, utils  # noqa: F401  (modeling registers the timm architecture)

        self.model = timm.create_model("musk_large_patch16_384")
        utils.load_model_and_may_interpolate(str(weights or "hf_hub:xiangjx/musk"), self.model, "model|module", "")

    def forward(self, x):
        return self.model(image=x, with_head=False, out_norm=False, ms_aug=False, return_global=True)[0]


def _extra(preset: Preset, package: str, install: str) -> None:
    EXTRAS[preset.name] = (preset, package, install)


_extra(Preset("conch_v1", "", None, {}, *CLIP, tile_px=512, transform=Transform(448, 448, "bicubic"),
              pool="model", pooling="encode_image, no projection (512-d)", precision="fp32",
              formats=("conch package",), build=_ConchV1, citation="Lu et al., Nat. Med. 2024 (CONCH)",
              licence="CC-BY-NC-ND-4.0", note="CONCH v1 through its authors' open_clip fork"),
       "conch", "pip install git+https://github.com/Mahmoodlab/CONCH.git")
_extra(Preset("musk", "", None, {}, *INCEPTION, tile_px=384, transform=Transform(384, 384, "bicubic"),
              pooling="vision class token, no projection (1024-d)", precision="fp16", formats=("musk package",),
              build=_Musk, citation="Xiang et al., Nature 2025 (MUSK)", licence="CC-BY-NC-ND-4.0",
              note="MUSK through its authors' package"),
       "musk", "pip install fairscale git+https://github.com/lilab-stanford/MUSK")


def build_extra(name: str, weights: Path | None, pretrained: bool) -> nn.Module:
    """The extra's model from its authors' package, or one line naming the package and how to install it."""
    preset, package, install = EXTRAS[name]
    if importlib.util.find_spec(package) is None:
        raise EncoderError(f"encoder '{name}' needs its authors' package '{package}', which is not installed: "
                           f"{install}")
    if not pretrained and weights is None:
        raise EncoderError(f"encoder '{name}' is built by its authors' package with their weights only: "
                           f"pass encoder.weights or leave encoder.pretrained=true")
    try:
        return preset.build(weights)
    except Exception as exc:  # their loaders raise their own types (hub, file, key errors)
        raise EncoderError(f"encoder '{name}': {package} could not build it: "
                           f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}") from None
