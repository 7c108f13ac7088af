"""MIL heads behind one contract (:mod:`.base`), one head per file, built through a registry.

``create_model(name, in_dim, n_classes, **kwargs)`` like timm's; a head registers itself with
``@register("name")``. Checkpoints store the name and kwargs and are rebuilt from them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ...errors import ConfigError
from .base import MILModel, MILOutput, masked_softmax

MODELS: dict[str, Callable[..., MILModel]] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def _accepted(fn) -> set[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class WithEmbedding(MILModel):
    """An extra first instance layer, ReLU(W_0 x), in front of any head (``model.embed_dim``): Ilse et al.
    2018 embed with fc-256 then fc-128 on the classical benchmarks."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float, head: MILModel):
        super().__init__()
        self.pre = torch.nn.Sequential(torch.nn.Linear(in_dim, embed_dim), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.head = head
        self.per_class, self.localises = head.per_class, head.localises

    def forward(self, x, mask):
        return self.head(self.pre(x), mask)

    def compute_loss(self, output, target, class_weight=None):
        return self.head.compute_loss(output, target, class_weight)


def create_model(name: str, in_dim: int, n_classes: int, embed_dim: int | None = None, **kwargs) -> MILModel:
    """A registered head (behind an extra embedding layer when ``embed_dim`` is set). Keyword arguments the
    head does not take are a one-line config error."""
    if embed_dim:
        head = create_model(name, embed_dim, n_classes, **kwargs)
        return WithEmbedding(in_dim, embed_dim, kwargs.get("dropout", 0.0), head)
    if name not in MODELS:
        raise ConfigError(f"config error: model.name: unknown MIL model '{name}' (choose from {', '.join(sorted(MODELS))})")
    fn = MODELS[name]
    accepted = _accepted(fn)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ConfigError(f"config error: model '{name}' takes no option '{unknown[0]}' "
                              f"(it takes {', '.join(sorted(accepted - {'in_dim', 'n_classes'}))})")
    return fn(in_dim=in_dim, n_classes=n_classes, **kwargs)


def model_kwargs(model) -> dict:
    """Keyword arguments a head is built with, from the ``model`` config (or a checkpoint's copy of it)."""
    m = model.model_dump() if hasattr(model, "model_dump") else dict(model)
    return {"hidden_dim": m["hidden_dim"], "attention_dim": m["attention_dim"], "dropout": m["dropout"],
            "embed_dim": m.get("embed_dim"), **(m.get("kwargs") or {})}


def build_model(model, in_dim: int, n_classes: int) -> MILModel:
    """The head a ``model`` config (or a checkpoint's stored copy) describes."""
    name = model.name if hasattr(model, "name") else model["name"]
    return create_model(name, in_dim, n_classes, **model_kwargs(model))


from . import abmil, clam, dsmil, pooling, transmil  # noqa: E402,F401  (registration)

__all__ = ["MODELS", "MILModel", "MILOutput", "build_model", "create_model", "masked_softmax", "model_kwargs",
           "register"]
