"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018).

    h_k = ReLU(W x_k)                                    instance embedding
    a_k = w^T tanh(V h_k)                                attention            (``abmil``)
    a_k = w^T (tanh(V h_k) * sigm(U h_k))                gated attention      (``abmil_gated``)
    z   = sum_k softmax(a)_k h_k ;  logits = W_c z

Instance scores are the attention logits a_k (before the softmax).
"""

from __future__ import annotations

import torch

from .base import GatedAttention, MILModel, MILOutput, embed, masked_softmax, neg_inf_outside
from .registry import AttentionOptions, register


class ABMIL(MILModel):
    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, gated: bool = False):
        super().__init__()
        self.embed = embed(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, 1, gated)
        self.classifier = torch.nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        att = neg_inf_outside(self.attention(h).squeeze(-1), mask)
        z = torch.einsum("bn,bnh->bh", masked_softmax(att, mask), h)
        return MILOutput(self.classifier(z), att)


@register("abmil", AttentionOptions, paper="Ilse, Tomczak & Welling 2018, Attention-based deep MIL (ICML)")
def abmil(in_dim: int, n_classes: int, o: AttentionOptions) -> ABMIL:
    return ABMIL(in_dim, n_classes, o.hidden_dim, o.attention_dim, o.dropout, gated=False)


@register("abmil_gated", AttentionOptions, paper="Ilse, Tomczak & Welling 2018, gated attention (ICML)")
def abmil_gated(in_dim: int, n_classes: int, o: AttentionOptions) -> ABMIL:
    return ABMIL(in_dim, n_classes, o.hidden_dim, o.attention_dim, o.dropout, gated=True)
