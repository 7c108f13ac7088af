"""The encoder registry: each preset carries its authors' recipe, restated from the model card.

A :class:`Preset` is the timm architecture and keyword arguments, the normalisation, the input geometry
(the native tile edge and µm/px, then resize / centre crop / interpolation exactly as the official
transform does them, on PIL images), how the feature is pooled, the weight formats its files are
published in, and the citation and licence. One file per family registers its presets
(:mod:`.resnet`, :mod:`.vit`, :mod:`.kaiko`, :mod:`.hibou`, :mod:`.conch`); every registered preset is covered by the conformance test
(tests/test_encoders.py), which builds the official recipe independently and compares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Transform:
    """The official eval transform's geometry: shorter side resized to ``resize`` with ``interpolation``
    (PIL, as torchvision's ``Resize`` does on PIL images), then a centre crop of ``crop`` px."""

    resize: int
    crop: int
    interpolation: str = "bilinear"  # bilinear | bicubic


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # local timm architecture
    hub: str | None  # where pretrained weights come from through timm; None: see hub_file
    kwargs: dict = field(default_factory=dict)
    mean: tuple = IMAGENET[0]
    std: tuple = IMAGENET[1]
    tile_px: int = 224  # the native tile: edge in px ...
    mpp: float = 0.5  # ... at this many µm/px
    transform: Transform = Transform(224, 224)
    pool: str = "model"  # model: the timm model's pooled output; cls+mean: CLS ++ mean of patch tokens
    pooling: str = "class token"  # in words, for wsi-mil encoders
    precision: str = "fp16"  # on GPU
    formats: tuple[str, ...] = ("timm",)  # weight files accepted (see weights.CONVERTERS)
    citation: str = ""
    licence: str = ""
    hub_file: tuple[str, str] | None = None  # (repo, file) of a published file timm cannot load: converted
    build: Callable[[nn.Module], nn.Module] | None = None  # in place, before weights load (e.g. truncation)
    drop: tuple[str, ...] = ()  # key prefixes of published files the truncation removes
    adapt: Callable[[nn.Module, dict], dict] | None = None  # the authors' own load-time fix-ups (CONCH v1.5)
    note: str = ""

    @property
    def input_size(self) -> int:
        return self.transform.crop

    @property
    def model_mpp(self) -> float:
        """µm per pixel the model sees on a native tile (after the resize)."""
        return self.mpp * self.tile_px / self.transform.resize


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"encoder preset '{preset.name}' is registered twice")
    PRESETS[preset.name] = preset
    return preset


def swiglu(**kw) -> dict:
    """timm keyword arguments for the SwiGLU MLP the Virchow and UNI2 cards pass."""
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **kw}
