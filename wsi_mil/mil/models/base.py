"""The contract every MIL head follows (after torchmil's ``forward`` / ``compute_loss`` split).

``forward(features[B, N, D], mask[B, N] bool, coords[B, N, 2] | None = None) -> MILOutput``:

- ``coords``: the patches' grid cells (col, row) from the patch grid, carried by the bag cache; heads
  that use positions (``uses_positions`` in the registry) build their neighbourhood from them
  (:mod:`.graph`), the others ignore them. ``None`` means no positions: no instance has neighbours.
- ``features`` and ``coords`` are read-only: with one bag per step they are views of the cached bag,
  so a head that wrote into them would change the bag for every later epoch (tested for every head).

- ``logits``: [B, C] bag logits;
- ``instance_scores``: [B, N], or [B, C, N] for heads with per-class attention (``per_class = True``);
  higher means more important. Padded positions (mask False) are ``-inf``, so they drop out of any
  softmax and never rank;
- ``aux``: anything else a head's loss needs (e.g. CLAM's instance logits).

``compute_loss(output, target, class_weight=None, bag_loss=None) -> dict`` returns named losses and their
weighted total under ``"loss"``. The bag term is the task's ``bag_loss(logits, target)`` (survival's NLL or
Cox, :mod:`wsi_mil.mil.tasks`), or cross-entropy for classification. Auxiliary losses live in the head's
own file; the training loop stays generic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class MILOutput:
    logits: torch.Tensor
    instance_scores: torch.Tensor
    aux: dict = field(default_factory=dict)


class MILModel(nn.Module):
    per_class: bool = False  # instance_scores is [B, C, N]
    localises: bool = True  # its instance scores are claimed to find the instances behind the label (tested)

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        return {"bag": bag, "loss": bag}


def bag_term(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None,
             bag_loss=None) -> torch.Tensor:
    """The bag loss: the task's ``bag_loss``, or (classification) cross-entropy, each bag's term times its
    class's ``class_weight``, averaged over the bags. (torch's weighted mean divides by the weights' sum
    instead, which undoes the weight for one bag per step, the default, and makes a batch of ``B`` bags
    differ from ``B`` accumulated steps.)"""
    if bag_loss is not None:
        return bag_loss(logits, target)
    return F.cross_entropy(logits.float(), target, weight=class_weight, reduction="none").mean()


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over instances that are present (``mask`` broadcast to ``logits``); an empty bag gets zeros."""
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def embed(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The instance-embedding MLP shared by most heads (Ilse et al. 2018, step 1)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """a_k = w^T (tanh(V h_k) * sigm(U h_k)), or w^T tanh(V h_k) without the gate; ``branches`` outputs."""

    def __init__(self, hidden_dim: int, attention_dim: int, branches: int = 1, gated: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(hidden_dim, attention_dim)
        self.U = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.drop = nn.Dropout(dropout)
        self.w = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, N, H] -> attention logits [B, N, branches]."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(self.drop(a))


def neg_inf_outside(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores with padded instances at -inf; ``mask`` [B, N] broadcast over a class axis if present."""
    m = mask if scores.dim() == mask.dim() else mask.unsqueeze(1)
    return scores.masked_fill(~m, float("-inf"))
