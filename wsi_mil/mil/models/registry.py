"""The registry of MIL heads (like timm's ``_registry``): a head is one file that defines its options and
registers a builder with ``@register("name", Options)``; ``wsi_mil.mil.models`` imports every head file.

Each head declares its own options as a typed, frozen pydantic model that forbids unknown keys, so a
misspelt or out-of-range option (``k_samples``, ``instance_loss=hinge``, ``landmarks=0``) is a one-line
:class:`~wsi_mil.errors.ConfigError`, never a ``ValueError`` from inside a constructor. The config's
shared ``model.hidden_dim`` / ``attention_dim`` / ``dropout`` reach a head only if its options declare
them; ``model.kwargs`` must all be its options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import ConfigError
from .base import MILModel

SHARED = ("hidden_dim", "attention_dim", "dropout")  # model.* keys a head may declare


class HeadOptions(BaseModel):
    """Base of every head's options: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbedOptions(HeadOptions):
    hidden_dim: int = Field(256, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)


class AttentionOptions(EmbedOptions):
    attention_dim: int = Field(128, ge=1)


class MultiHeadOptions(AttentionOptions):
    """Options of heads with multi-head attention over ``hidden_dim``: ``heads`` must divide it."""

    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _divisible(self):
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of heads {self.heads}")
        return self


@dataclass(frozen=True)
class Head:
    name: str
    options: type[HeadOptions]
    build: Callable[[int, int, HeadOptions], MILModel]  # (in_dim, n_classes, options) -> head
    paper: str = ""  # the paper whose equations it implements
    uses_positions: bool = False  # reads the patches' grid cells (forward's coords)


MODELS: dict[str, Head] = {}


def register(name: str, options: type[HeadOptions], paper: str = "", uses_positions: bool = False):
    def deco(build: Callable[[int, int, HeadOptions], MILModel]):
        if name in MODELS:
            raise ValueError(f"MIL head '{name}' is registered twice")
        MODELS[name] = Head(name, options, build, paper, uses_positions)
        return build
    return deco


def head(name: str) -> Head:
    if name not in MODELS:
        raise ConfigError(f"config error: model.name: unknown MIL model '{name}' (choose from {', '.join(sorted(MODELS))})")
    return MODELS[name]


def head_options(name: str, values: dict) -> HeadOptions:
    """``values`` validated as head ``name``'s options; anything else is one ConfigError line."""
    entry = head(name)
    try:
        return entry.options.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config error: model '{name}' takes no option '{key}' "
                              f"(it takes {', '.join(entry.options.model_fields)})") from None
        raise ConfigError(f"config error: model '{name}' option '{key}': {err['msg']}") from None


class WithEmbedding(MILModel):
    """An extra first instance layer, ReLU(W_0 x), in front of any head (``model.embed_dim``): Ilse et al.
    2018 embed with fc-256 then fc-128 on the classical benchmarks."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float, inner: MILModel):
        super().__init__()
        self.pre = torch.nn.Sequential(torch.nn.Linear(in_dim, embed_dim), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.head = inner
        self.per_class, self.localises = inner.per_class, inner.localises

    def forward(self, x, mask, coords=None):
        return self.head(self.pre(x), mask, coords)

    def compute_loss(self, output, target, class_weight=None, bag_loss=None):
        return self.head.compute_loss(output, target, class_weight, bag_loss)


def create_model(name: str, in_dim: int, n_classes: int, embed_dim: int | None = None, **options) -> MILModel:
    """A registered head built with ``options`` (its own, validated), behind an extra embedding layer when
    ``embed_dim`` is set."""
    entry = head(name)
    opts = head_options(name, options)
    if embed_dim:
        return WithEmbedding(in_dim, embed_dim, float(getattr(opts, "dropout", 0.0)),
                             entry.build(embed_dim, n_classes, opts))
    return entry.build(in_dim, n_classes, opts)


def build_model(model, in_dim: int, n_classes: int) -> MILModel:
    """The head a ``model`` config (or a checkpoint's stored copy of it) describes: the shared keys the head
    declares, then ``model.kwargs``."""
    m = model.model_dump() if hasattr(model, "model_dump") else dict(model)
    entry = head(m["name"])
    shared = {k: m[k] for k in SHARED if k in entry.options.model_fields and m.get(k) is not None}
    return create_model(m["name"], in_dim, n_classes, m.get("embed_dim"), **{**shared, **(m.get("kwargs") or {})})
