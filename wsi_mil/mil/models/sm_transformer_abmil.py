"""SmTransformerABMIL ("SmTAP"): transformer layers whose self-attention output is smoothed over the patch
grid, then the Sm attention pool (Castro-Macías et al., "Sm: enhanced localization in Multiple Instance
Learning for medical imaging classification", NeurIPS 2024; torchmil's ``SmTransformerABMIL``).

    h_k = ReLU(W x_k)
    Z   = H + Sm(MHSA(LN(H))) ;  H' = Z + MLP(LN(Z))   each layer (:mod:`.transformer`), then LN
    X   = Sm(H') ;  f_k = w^T tanh(V X_k) ;  z = sum_k softmax(f)_k X_k ;  logits = W_c z

The layers' Sm and the pool's Sm each learn their own alpha. Instance scores are f_k.

Not claimed to localise (``localises = False``): after self-attention every token carries the whole bag,
so the pooling attention need not point at the instances behind the label. On digits-bags its instance
AUROC is 0.37 (tests/test_mil.py setting), against the 0.9 the localising heads reach; its maps are
still drawn, as TransMIL's are.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, MILOutput, embed
from .graph import Sm, grid_graph
from .registry import register
from .sm_abmil import SmAttentionPool, SmOptions
from .transformer import TransformerLayer
from .transformer_abmil import TransformerOptions


class SmTransformerOptions(SmOptions, TransformerOptions):
    pass


class SmTransformerABMIL(MILModel):
    localises = False  # self-attention mixes the bag first: see the module docstring
    def __init__(self, in_dim: int, n_classes: int, o: SmTransformerOptions):
        super().__init__()
        self.embed = embed(in_dim, o.hidden_dim, o.dropout)
        self.layers = nn.ModuleList(TransformerLayer(o.hidden_dim, o.heads, o.dropout, Sm(o.sm_alpha, o.sm_steps))
                                    for _ in range(o.layers))
        self.norm = nn.LayerNorm(o.hidden_dim)
        self.pool = SmAttentionPool(o.hidden_dim, o.attention_dim, o.sm_alpha, o.sm_steps)
        self.classifier = nn.Linear(o.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        graph = grid_graph(coords, mask)
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, mask, graph)
        z, att = self.pool(self.norm(h), mask, graph)
        return MILOutput(self.classifier(z), att)


@register("sm_transformer_abmil", SmTransformerOptions,
          paper="Castro-Macías et al. 2024, Sm transformer + smooth attention (SmTAP, NeurIPS)", uses_positions=True)
def sm_transformer_abmil(in_dim: int, n_classes: int, o: SmTransformerOptions) -> SmTransformerABMIL:
    return SmTransformerABMIL(in_dim, n_classes, o)
