"""CAMIL (Fourkioti, De Vries & Bakal, "CAMIL: Context-aware multiple instance learning for cancer detection
and subtyping in whole slide images", ICLR 2024; torchmil's ``CAMIL``).

    h_k = ReLU(W x_k)
    T   = h + NystromAttention(LN(h))                   global context (Nyström transformer layer, as TransMIL's)
    q_k, k_k = W_q T_k, W_k T_k ;  v_k = W_v T_k
    w_i = (1/sqrt(d)) sum_{j in N(i)} q_i . k_j        neighbour-constrained attention over the patch grid
    l_i = softmax_i(w) v_i                              (softmax over the bag's instances)
    M   = sigm(L) * L + (1 - sigm(L)) * T               gate between local and global context
    f_k = w^T (tanh(V T_k) * sigm(U T_k)) ;  z = sum_k softmax(f)_k M_k ;  logits = W_c z

N(i) is the 8-neighbourhood on the grid (the paper joins each patch to its nearest spatial neighbours).
Instance scores are f_k. Bags run one at a time on their present instances (the Nyström layer must not
see padding).

Not claimed to localise (``localises = False``): after self-attention every token carries the whole bag,
so the pooling attention need not point at the instances behind the label. On digits-bags its instance
AUROC is 0.30 (tests/test_mil.py setting), against the 0.9 the localising heads reach; its maps are
still drawn, as TransMIL's are.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from .base import GatedAttention, MILModel, MILOutput, embed, masked_softmax, neg_inf_outside
from .graph import grid_graph, neighbour_sum
from .registry import MultiHeadOptions, register
from .transmil import TransLayer


class CAMILOptions(MultiHeadOptions):
    heads: int = Field(8, ge=1)
    landmarks: int = Field(64, ge=1)


class CAMIL(MILModel):
    localises = False  # self-attention mixes the bag first: see the module docstring
    def __init__(self, in_dim: int, n_classes: int, o: CAMILOptions):
        super().__init__()
        d = o.hidden_dim
        self.embed = embed(in_dim, d, o.dropout)
        self.context = TransLayer(d, o.heads, o.landmarks, o.dropout)
        self.qk = nn.Linear(d, 2 * o.attention_dim)
        self.v = nn.Linear(d, d)
        self.attention = GatedAttention(d, o.attention_dim, 1, gated=True)
        self.classifier = nn.Linear(d, n_classes)

    def _context(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = torch.zeros_like(h)
        for b in range(h.shape[0]):
            if mask[b].any():
                t[b, mask[b]] = self.context(h[b, mask[b]][None])[0][0]
        return t

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        t = self._context(self.embed(x), mask)
        q, k = self.qk(t).chunk(2, dim=-1)
        w = (q * neighbour_sum(k, grid_graph(coords, mask))).sum(-1) / math.sqrt(q.shape[-1])
        local = masked_softmax(neg_inf_outside(w, mask), mask).unsqueeze(-1) * self.v(t)
        gate = torch.sigmoid(local)
        m = gate * local + (1 - gate) * t
        att = neg_inf_outside(self.attention(t).squeeze(-1), mask)
        z = torch.einsum("bn,bnh->bh", masked_softmax(att, mask), m)
        return MILOutput(self.classifier(z), att)


@register("camil", CAMILOptions, paper="Fourkioti, De Vries & Bakal 2024, CAMIL context-aware MIL (ICLR)",
          uses_positions=True)
def camil(in_dim: int, n_classes: int, o: CAMILOptions) -> CAMIL:
    return CAMIL(in_dim, n_classes, o)
