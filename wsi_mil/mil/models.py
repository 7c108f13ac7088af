"""MIL heads. One contract for all of them:

    forward(features[B, N, D], mask[B, N] bool) -> (logits[B, C], attention_logits[B, N])

Attention logits are taken before the softmax; padded positions (mask False) are -inf, so they are
excluded from any softmax and easy to drop. Models are built through a registry (``create_model``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def create_model(name: str, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown MIL model '{name}' (choose from {', '.join(sorted(MODELS))})")
    return MODELS[name](in_dim=in_dim, n_classes=n_classes, hidden_dim=hidden_dim,
                        attention_dim=attention_dim, dropout=dropout)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over instances that are present; an all-empty bag gets all-zero weights."""
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    return torch.nan_to_num(weights, nan=0.0)


class _Embed(nn.Module):
    """The instance-embedding MLP (Ilse et al. 2018, step 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class ABMIL(nn.Module):
    """Attention-based deep MIL (Ilse, Tomczak & Welling, 2018).

    a_k = w^T tanh(V h_k)                      (attention)
    a_k = w^T (tanh(V h_k) * sigm(U h_k))       (gated attention)
    z = sum_k softmax(a)_k h_k ;  logits = classifier(z)
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, gated: bool = False):
        super().__init__()
        self.embed = _Embed(in_dim, hidden_dim, dropout)
        self.V = nn.Linear(hidden_dim, attention_dim)
        self.U = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        h = self.embed(x)
        att = self.attention(h).masked_fill(~mask, float("-inf"))
        z = torch.einsum("bn,bnh->bh", masked_softmax(att, mask), h)
        return self.classifier(z), att


class MeanPool(nn.Module):
    """Baseline: mean of instance embeddings; every present instance gets the same attention logit (0)."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25, **_):
        super().__init__()
        self.embed = _Embed(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, x, mask):
        h = self.embed(x) * mask.unsqueeze(-1)
        z = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        att = torch.zeros(mask.shape, device=x.device, dtype=h.dtype).masked_fill(~mask, float("-inf"))
        return self.classifier(z), att


class MaxPool(nn.Module):
    """Baseline: element-wise max of instance embeddings. Its per-instance score is the largest class
    logit the classifier gives that instance alone."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25, **_):
        super().__init__()
        self.embed = _Embed(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, x, mask):
        h = self.embed(x)
        z = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        z = torch.nan_to_num(z, neginf=0.0)
        att = self.classifier(h).amax(-1).masked_fill(~mask, float("-inf"))
        return self.classifier(z), att


register("abmil")(lambda **kw: ABMIL(gated=False, **kw))
register("abmil_gated")(lambda **kw: ABMIL(gated=True, **kw))
register("meanpool")(MeanPool)
register("maxpool")(MaxPool)
