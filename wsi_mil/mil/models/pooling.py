"""Baselines under the same contract: mean and max pooling of instance embeddings.

- ``meanpool``: z = mean_k h_k; every present instance scores 0 (no localisation).
- ``maxpool``: z = max_k h_k (element-wise); an instance's score is the largest class logit the
  classifier gives it alone.

Baselines make no localisation claim (``localises = False``).
"""

from __future__ import annotations

import torch

from .base import MILModel, MILOutput, embed, neg_inf_outside
from .registry import EmbedOptions, register


class MeanPool(MILModel):
    localises = False  # see the module docstring
    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = embed(in_dim, hidden_dim, dropout)
        self.classifier = torch.nn.Linear(hidden_dim, n_classes)

    def forward(self, x, mask, coords=None):
        h = self.embed(x) * mask.unsqueeze(-1)
        z = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return MILOutput(self.classifier(z), neg_inf_outside(torch.zeros(mask.shape, device=x.device), mask))


class MaxPool(MeanPool):
    def forward(self, x, mask, coords=None):
        h = self.embed(x)
        z = torch.nan_to_num(h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1), neginf=0.0)
        scores = neg_inf_outside(self.classifier(h).amax(-1), mask)
        return MILOutput(self.classifier(z), scores)


@register("meanpool", EmbedOptions, paper="mean pooling baseline (Wang et al. 2018, Revisiting MIL networks)")
def meanpool(in_dim: int, n_classes: int, o: EmbedOptions) -> MeanPool:
    return MeanPool(in_dim, n_classes, o.hidden_dim, dropout=o.dropout)


@register("maxpool", EmbedOptions, paper="max pooling baseline (Wang et al. 2018, Revisiting MIL networks)")
def maxpool(in_dim: int, n_classes: int, o: EmbedOptions) -> MaxPool:
    return MaxPool(in_dim, n_classes, o.hidden_dim, dropout=o.dropout)
