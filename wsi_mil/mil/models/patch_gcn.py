"""Patch-GCN (Chen, Lu, Weng, Chen, Williamson, Manz, Shady & Mahmood, "Whole slide images are 2D point
clouds: context-aware survival prediction using patch-based graph convolutional networks", MICCAI 2021).

The slide is a graph whose nodes are patches and whose edges join each patch to its spatial neighbours
(the paper: the 8 nearest by position, which on a regular grid is the 8-neighbourhood used here). Layers,
as in the paper's DeepGCN (Li et al., "DeeperGCN", 2020) with residual "res+" blocks:

    h^0 = ReLU(W_0 x)
    h^1 = GEN(h^0) ;  h^{l+1} = h^l + GEN(Dropout(ReLU(LN(h^l))))        l = 1 .. L-1
    GEN(h)_i = MLP(h_i + sum_{j in N(i)} softmax_j(t * m_ij) * m_ij),   m_ij = ReLU(h_j) + 1e-7
                                                                       (softmax per channel, t learnt)
    MLP = Linear(D, 2D), LN, ReLU, Linear(2D, D)
    H_k = phi([h^0_k, h^1_k, ..., h^L_k])                 phi = Linear(D(L+1), D), ReLU, Dropout
    a_k = w^T (tanh(V H_k) * sigm(U H_k)) ;  z = sum_k softmax(a)_k H_k ;  logits = W_c ReLU(W_r z)

Instance scores are a_k. Without positions (``coords=None``) no node has neighbours and GEN reduces to
MLP(h_i): Patch-GCN is then a gated-attention MIL with a deeper instance network.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import GatedAttention, MILModel, MILOutput, embed, masked_softmax, neg_inf_outside
from .graph import GridGraph, grid_graph
from .registry import AttentionOptions, register


class GENConv(nn.Module):
    """Generalised graph convolution with learnable softmax aggregation (DeeperGCN, eqs. 3-4)."""

    def __init__(self, dim: int, eps: float = 1e-7):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.0))
        self.eps = eps
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def aggregate(self, h: torch.Tensor, graph: GridGraph) -> torch.Tensor:
        b, n, d = h.shape
        flat = h.reshape(b * n, d)
        msg = torch.relu(flat[graph.dst]) + self.eps  # [E, D]
        logit = self.t * msg
        with torch.no_grad():  # the per-node max only steadies exp(); softmax does not depend on it
            top = torch.full_like(flat, float("-inf")).scatter_reduce_(
                0, graph.src[:, None].expand(-1, d), logit, "amax")
        w = torch.exp(logit - top[graph.src])
        total = torch.zeros_like(flat).index_add_(0, graph.src, w)
        agg = torch.zeros_like(flat).index_add_(0, graph.src, w * msg) / total.clamp_min(1e-30)
        return agg.reshape(b, n, d)

    def forward(self, h: torch.Tensor, graph: GridGraph) -> torch.Tensor:
        return self.mlp(h + self.aggregate(h, graph))


class PatchGCNOptions(AttentionOptions):
    hidden_dim: int = Field(128, ge=1)
    layers: int = Field(3, ge=1, le=8)


class PatchGCN(MILModel):
    def __init__(self, in_dim: int, n_classes: int, o: PatchGCNOptions):
        super().__init__()
        d = o.hidden_dim
        self.embed = embed(in_dim, d, o.dropout)
        self.convs = nn.ModuleList(GENConv(d) for _ in range(o.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(o.layers - 1))
        self.drop = nn.Dropout(o.dropout)
        self.phi = nn.Sequential(nn.Linear(d * (o.layers + 1), d), nn.ReLU(), nn.Dropout(o.dropout))
        self.attention = GatedAttention(d, o.attention_dim, 1, gated=True, dropout=o.dropout)
        self.rho = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(o.dropout))
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        graph = grid_graph(coords, mask)
        h = self.embed(x)
        outs = [h, self.convs[0](h, graph)]
        for conv, norm in zip(self.convs[1:], self.norms):
            outs.append(outs[-1] + conv(self.drop(torch.relu(norm(outs[-1]))), graph))
        hh = self.phi(torch.cat(outs, dim=-1))
        att = neg_inf_outside(self.attention(hh).squeeze(-1), mask)
        z = torch.einsum("bn,bnh->bh", masked_softmax(att, mask), hh)
        return MILOutput(self.classifier(self.rho(z)), att)


@register("patch_gcn", PatchGCNOptions, paper="Chen et al. 2021, Patch-GCN (MICCAI)", uses_positions=True)
def patch_gcn(in_dim: int, n_classes: int, o: PatchGCNOptions) -> PatchGCN:
    return PatchGCN(in_dim, n_classes, o)
