"""MIL heads behind one contract (:mod:`.base`), one head per file, built through a registry (:mod:`.registry`).

``create_model(name, in_dim, n_classes, **options)`` like timm's; a head file registers a builder with
``@register("name", Options)``. Checkpoints store the name and options and are rebuilt from them.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each registers its heads)
    abmil,
    camil,
    clam,
    dsmil,
    dtfd_mil,
    iibmil,
    patch_gcn,
    pooling,
    prob_smooth_abmil,
    sm_abmil,
    sm_transformer_abmil,
    transformer_abmil,
    transmil,
)
from .base import MILModel, MILOutput, masked_softmax
from .registry import MODELS, HeadOptions, build_model, create_model, head_options, register

__all__ = ["MODELS", "HeadOptions", "MILModel", "MILOutput", "build_model", "create_model", "head_options",
           "masked_softmax", "register"]
