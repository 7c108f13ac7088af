"""SmABMIL: attention-based MIL with the smooth operator over the patch grid (Castro-Macías, Morales-Álvarez,
Wu, Molina & Katsaggelos, "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024; torchmil's ``SmABMIL`` with ``sm_where='early'``).

    h_k = ReLU(W x_k)                                  instance embedding
    X   = Sm(h)                                        smooth operator on the 8-neighbour grid graph (:class:`.graph.Sm`)
    f_k = w^T tanh(V X_k)                              attention values
    z   = sum_k softmax(f)_k X_k ;  logits = W_c z

Sm pulls each instance towards its neighbours (it minimises the Dirichlet energy tr(X^T L X) against
staying close to h), so the attention map is smooth over the tissue, which is what localises contiguous
lesions. Instance scores are f_k. ``coords=None`` (no positions): Sm only rescales, and SmABMIL is ABMIL.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import GatedAttention, MILModel, MILOutput, embed, masked_softmax, neg_inf_outside
from .graph import GridGraph, Sm, grid_graph
from .registry import AttentionOptions, register


class SmOptions(AttentionOptions):
    sm_alpha: float | None = Field(None, gt=0, lt=1)  # None: learnt, starting at 0.5
    sm_steps: int = Field(10, ge=1, le=100)  # fixed-point steps approximating (1-a)(I - a Â)^-1


class SmAttentionPool(nn.Module):
    """z = sum_k softmax(f)_k X_k with X = Sm(h), f = w^T tanh(V X) (the pool of SmABMIL and SmTAP)."""

    def __init__(self, dim: int, attention_dim: int, sm_alpha: float | None, sm_steps: int):
        super().__init__()
        self.sm = Sm(sm_alpha, sm_steps)
        self.attention = GatedAttention(dim, attention_dim, 1, gated=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, graph: GridGraph) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sm(h, graph)
        att = neg_inf_outside(self.attention(x).squeeze(-1), mask)
        return torch.einsum("bn,bnh->bh", masked_softmax(att, mask), x), att


class SmABMIL(MILModel):
    def __init__(self, in_dim: int, n_classes: int, o: SmOptions):
        super().__init__()
        self.embed = embed(in_dim, o.hidden_dim, o.dropout)
        self.pool = SmAttentionPool(o.hidden_dim, o.attention_dim, o.sm_alpha, o.sm_steps)
        self.classifier = nn.Linear(o.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        z, att = self.pool(self.embed(x), mask, grid_graph(coords, mask))
        return MILOutput(self.classifier(z), att)


@register("sm_abmil", SmOptions, paper="Castro-Macías et al. 2024, Sm: smooth attention (NeurIPS)",
          uses_positions=True)
def sm_abmil(in_dim: int, n_classes: int, o: SmOptions) -> SmABMIL:
    return SmABMIL(in_dim, n_classes, o)
