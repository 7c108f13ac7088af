"""DSMIL (Li, Li & Eliceiri, "Dual-stream multiple instance learning network for whole slide image
classification with self-supervised contrastive learning", CVPR 2021).

    h_k  = ReLU(W x_k)                                  embedding
    c_k  = W_i h_k                                      instance classifier (stream 1), [N, C]
    m_c  = argmax_k c_k,c                               critical instance of each class
    q_k  = Q(h_k),  U_k,c = <q_k, q_{m_c}> / sqrt(d)     distance to the critical instance
    b_c  = sum_k softmax_k(U_.,c) V(h_k)                 bag embedding per class (stream 2)
    y_c  = Conv1d over (b_1..b_C)                        bag classifier
    loss = (1 - w) CE(y) + w CE(max_k c_k)               w = ``instance_weight`` (0.5 in the paper)

Instance scores: the instance classifier's logits c_k,c, one map per class ([B, C, N]).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from .base import MILModel, MILOutput, bag_term, embed, masked_softmax, neg_inf_outside
from .registry import AttentionOptions, register


class DSMIL(MILModel):
    per_class = True

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, instance_weight: float = 0.5):
        super().__init__()
        self.instance_weight = instance_weight
        self.embed = embed(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.q = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.ReLU(), nn.Linear(attention_dim, attention_dim),
                               nn.Tanh())
        self.v = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # [B, N, H]
        c = neg_inf_outside(self.instance_classifier(h).transpose(1, 2), mask)  # [B, C, N]
        critical = c.argmax(-1)  # [B, C]
        h_m = torch.gather(h, 1, critical.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, C, H]
        q, q_m = self.q(h), self.q(h_m)
        u = neg_inf_outside(q_m @ q.transpose(1, 2) / math.sqrt(q.shape[-1]), mask)  # [B, C, N]
        bag = masked_softmax(u, mask.unsqueeze(1)) @ self.v(h)  # [B, C, H]
        logits = self.bag_classifier(bag).squeeze(-1)  # [B, C]
        max_instance = torch.nan_to_num(c.amax(-1), neginf=0.0)  # [B, C]
        return MILOutput(logits, c, {"max_instance": max_instance})

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        """Under any task the max-instance term is the task's own bag loss on the max-instance logits
        (cross-entropy for classification; the survival NLL or Cox on the critical instance's outputs)."""
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        inst = bag_term(output.aux["max_instance"], target, class_weight, bag_loss)
        w = self.instance_weight
        return {"bag": bag, "max_instance": inst, "loss": (1 - w) * bag + w * inst}


class DSMILOptions(AttentionOptions):
    instance_weight: float = Field(0.5, ge=0, le=1)  # loss = (1 - w) * bag + w * max-instance


@register("dsmil", DSMILOptions, paper="Li, Li & Eliceiri 2021, Dual-stream MIL (CVPR)")
def dsmil(in_dim: int, n_classes: int, o: DSMILOptions) -> DSMIL:
    return DSMIL(in_dim, n_classes, o.hidden_dim, o.attention_dim, o.dropout, o.instance_weight)
