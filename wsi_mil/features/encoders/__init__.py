"""Patch encoders: a registry of presets, each carrying its authors' recipe (:mod:`.registry`), weight
files in their published formats (:mod:`.weights`), and the builder (:mod:`.build`). Families: :mod:`.resnet`,
:mod:`.vit`, :mod:`.kaiko` (with Midnight), :mod:`.hibou`, :mod:`.conch`."""

from . import conch, hibou, kaiko, resnet, vit  # noqa: F401  (each registers its presets)
from .build import Encoder, build_encoder, feature_dim, recipe
from .extras import EXTRAS
from .registry import IMAGENET, PRESETS, Preset, Transform, register
from .weights import EncoderError, load_state_dict

__all__ = ["EXTRAS", "IMAGENET", "PRESETS", "Encoder", "EncoderError", "Preset", "Transform", "build_encoder", "feature_dim",
           "load_state_dict", "recipe", "register"]
