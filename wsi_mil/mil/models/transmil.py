"""TransMIL (Shao et al., "TransMIL: Transformer based correlated multiple instance learning for whole
slide image classification", NeurIPS 2021).

    h = ReLU(W x)                                      linear projection to ``hidden_dim``
    square: pad the sequence to side^2 tokens by repeating its first tokens, prepend a class token
    h = h + NystromAttention(LN(h))                    TPT layer 1
    h = PPEG(h)                                        7x7, 5x5 and 3x3 depthwise convolutions on the
                                                       side x side token grid, plus identity
    h = h + NystromAttention(LN(h))                    TPT layer 2
    logits = W_c LN(h)[class token]

Nyström attention (Xiong et al., AAAI 2021) is implemented here rather than taken from the
``nystrom-attention`` package: the instance scores need only the class token's row of the approximate
attention matrix, softmax(q_0 K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T), which that package can give only
as the full n x n matrix. Instance scores are the log of that row, averaged over heads, in the last
layer: an approximation of the class token's attention, not an exact softmax (exact for short bags, below).
They are not claimed to localise (``localises = False``): on digits-bags their instance AUROC is about 0.66,
far below the 0.9 the localising heads reach.

A sequence of at most ``landmarks`` tokens would use every token as a landmark, where the Nyström formula
equals softmax attention (up to the iterative pseudo-inverse): such sequences take softmax(QK^T)V directly,
exact and cheaper; the instance scores are then the class token's exact attention. Bags are run one at a
time on their present instances, so padding never enters the square or the attention; an empty bag is
classified from the class token alone.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from .base import MILModel, MILOutput
from .registry import EmbedOptions, register


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by the iterative method used in Nyströmformer."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).amax() * abs_x.sum(-2).amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6,
                 dropout: float = 0.1, residual_kernel: int = 33):
        super().__init__()
        self.heads, self.landmarks, self.iters = heads, landmarks, pinv_iterations
        self.dim_head = dim // heads
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (t.reshape(x.shape[0], -1, self.heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        return q * self.scale, k, v

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        return self.to_out(out.transpose(1, 2).reshape(out.shape[0], -1, self.heads * self.dim_head))

    def _exact(self, x: torch.Tensor, row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._qkv(x)
        att = torch.softmax(q @ k.transpose(-1, -2), -1)
        out = self._out(att @ v + self.res_conv(v))
        return out, (att[:, :, row].mean(1) if row is not None else None)

    def forward(self, x: torch.Tensor, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [1, n, dim] -> (out [1, n, dim], the attention row of token ``row`` over all n tokens, or None)."""
        b, n, _ = x.shape
        if n <= self.landmarks:  # every token would be a landmark: Nystrom is then exact, so take softmax itself
            return self._exact(x, row)
        m = self.landmarks
        pad = (m - n % m) % m  # pad at the front so the tokens split evenly into m landmark groups
        x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self._qkv(x)
        per = x.shape[1] // m
        q_l = q.reshape(b, self.heads, m, per, self.dim_head).mean(3)
        k_l = k.reshape(b, self.heads, m, per, self.dim_head).mean(3)
        a1 = torch.softmax(q @ k_l.transpose(-1, -2), -1)
        a2_inv = _pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), -1), self.iters)
        a3 = torch.softmax(q_l @ k.transpose(-1, -2), -1)
        out = (a1 @ a2_inv) @ (a3 @ v) + self.res_conv(v)
        out = self._out(out)[:, pad:]
        att_row = None
        if row is not None:
            att_row = ((a1[:, :, pad + row:pad + row + 1] @ a2_inv) @ a3)[:, :, 0, pad:].mean(1)  # [b, n]
        return out, att_row


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7x7 + 5x5 + 3x3 convolutions plus identity.

    The three convolutions are centred, zero-padded and linear, so their sum is one depthwise 7x7
    convolution whose kernel is the three kernels summed (the 5x5 and 3x3 centred in it) and whose bias is
    their biases summed: the same function, computed as one convolution forward and backward instead of
    three. The three layers stay as parameters (``convs.0-2``), the authors' layout."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one 7x7 depthwise kernel [dim, 1, 7, 7] and bias [dim] equal to the three convolutions."""
        big = self.convs[0].kernel_size[0]
        weight = sum(F.pad(c.weight, [(big - c.kernel_size[0]) // 2] * 4) for c in self.convs)
        return weight, sum(c.bias for c in self.convs)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        weight, bias = self.merged()
        grid = grid + F.conv2d(grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=weight.shape[-1] // 2,
                               groups=grid.shape[1])
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor, row: int | None = None):
        out, att = self.attn(self.norm(x), row)
        return x + out, att


class TransMIL(MILModel):
    localises = False  # see the module docstring
    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, heads: int = 8, landmarks: int | None = None, attention_dropout: float = 0.1):
        super().__init__()
        landmarks = landmarks or hidden_dim // 2
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = TransLayer(hidden_dim, heads, landmarks, attention_dropout)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, heads, landmarks, attention_dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_classes)

    def _bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag's present instances [n, D] -> (logits [C], scores [n])."""
        n = x.shape[0]
        h = self.fc(x)[None]
        if n == 0:
            return self.head(self.norm(self.cls_token))[0, 0], x.new_zeros(0)
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)  # square: repeat the first tokens
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, row = self.layer2(h, row=0)
        logits = self.head(self.norm(h)[:, 0])[0]
        return logits, torch.log(row[0, 1:n + 1].float().clamp_min(1e-12))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        logits, scores = [], torch.full(mask.shape, float("-inf"), device=x.device)
        for b in range(x.shape[0]):
            lg, sc = self._bag(x[b, mask[b]])
            logits.append(lg)
            scores[b, mask[b]] = sc.to(scores.dtype)
        return MILOutput(torch.stack(logits), scores)


class TransMILOptions(EmbedOptions):
    heads: int = Field(8, ge=1)
    landmarks: int | None = Field(None, ge=1)  # Nystrom landmarks (default hidden_dim // 2)
    attention_dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _divisible(self):
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of heads {self.heads}")
        return self


@register("transmil", TransMILOptions, paper="Shao et al. 2021, TransMIL (NeurIPS)")
def transmil(in_dim: int, n_classes: int, o: TransMILOptions) -> TransMIL:
    return TransMIL(in_dim, n_classes, o.hidden_dim, dropout=o.dropout, heads=o.heads, landmarks=o.landmarks,
                    attention_dropout=o.attention_dropout)
