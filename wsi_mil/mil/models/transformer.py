"""A pre-norm transformer encoder layer over a bag's instances (Vaswani et al. 2017; the layout torchmil's
TransformerABMIL and SmTransformerABMIL use, Castro-Macías et al. 2024, Sec. 4):

    Z = X + Sm(MHSA(LN(X)))        (Sm only in the smooth variant; identity otherwise)
    Y = Z + MLP(LN(Z))             MLP = Linear(D, 4D), GELU, Linear(4D, D)

Multi-head self-attention is softmax(QK^T / sqrt(d)) V over the present instances only: padded keys are
masked out, so a bag padded to a batch gives the same outputs as alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .graph import GridGraph, Sm


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0, smooth: Sm | None = None):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.smooth = smooth

    def attend(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MHSA(x) [B, N, D] with padded keys masked (an empty bag attends to its padding: finite, unused)."""
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        keys = mask | ~mask.any(1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        return self.out(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, graph: GridGraph | None = None) -> torch.Tensor:
        a = self.attend(self.norm1(x), mask)
        if self.smooth is not None:
            a = self.smooth(a, graph)
        z = x + self.drop(a)
        return z + self.drop(self.mlp(self.norm2(z)))
