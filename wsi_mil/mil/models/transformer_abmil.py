"""TransformerABMIL: a transformer encoder over the bag, then attention pooling (the "TAP" baseline of
Castro-Macías et al., "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024; torchmil's ``TransformerABMIL``).

    h_k = ReLU(W x_k)                                  instance embedding
    H   = LN(Layer_L(... Layer_1(h)))                  pre-norm transformer layers (:mod:`.transformer`)
    a_k = w^T tanh(V H_k)                               attention (Ilse et al. 2018)
    z   = sum_k softmax(a)_k H_k ;  logits = W_c z

Instance scores are the attention logits a_k. Positions are not used: context comes from self-attention.

Not claimed to localise (``localises = False``): after self-attention every token carries the whole bag,
so the pooling attention need not point at the instances behind the label. On digits-bags its instance
AUROC is 0.43 (tests/test_mil.py setting), against the 0.9 the localising heads reach; its maps are
still drawn, as TransMIL's are.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import GatedAttention, MILModel, MILOutput, embed, masked_softmax, neg_inf_outside
from .registry import MultiHeadOptions, register
from .transformer import TransformerLayer


class TransformerOptions(MultiHeadOptions):
    layers: int = Field(1, ge=1, le=12)


class TransformerABMIL(MILModel):
    localises = False  # self-attention mixes the bag first: see the module docstring
    def __init__(self, in_dim: int, n_classes: int, o: TransformerOptions):
        super().__init__()
        self.embed = embed(in_dim, o.hidden_dim, o.dropout)
        self.layers = nn.ModuleList(TransformerLayer(o.hidden_dim, o.heads, o.dropout) for _ in range(o.layers))
        self.norm = nn.LayerNorm(o.hidden_dim)
        self.attention = GatedAttention(o.hidden_dim, o.attention_dim, 1, gated=False)
        self.classifier = nn.Linear(o.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, mask)
        h = self.norm(h)
        att = neg_inf_outside(self.attention(h).squeeze(-1), mask)
        z = torch.einsum("bn,bnh->bh", masked_softmax(att, mask), h)
        return MILOutput(self.classifier(z), att)


@register("transformer_abmil", TransformerOptions,
          paper="Castro-Macías et al. 2024, transformer + attention pooling (TAP), Sm (NeurIPS)")
def transformer_abmil(in_dim: int, n_classes: int, o: TransformerOptions) -> TransformerABMIL:
    return TransformerABMIL(in_dim, n_classes, o)
