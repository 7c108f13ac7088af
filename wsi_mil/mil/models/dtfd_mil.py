"""DTFD-MIL (Zhang, Meng, Wang, Coupland, Hu & Zhou, "DTFD-MIL: Double-tier feature distillation multiple
instance learning for histopathology whole slide image classification", CVPR 2022).

    h_k = ReLU(W x_k)                                   dimension reduction
    Split the bag at random into M pseudo-bags X_1..X_M (``groups``; sizes differ by at most one),
    each with the bag's label.
    Tier 1, per pseudo-bag m:  a = softmax_k(w^T (tanh(V h_k) * sigm(U h_k))),  y_m = W_1 sum_k a_k h_k
    Instance logits (the paper's Grad-CAM derivation under AB-MIL):  s_k,c = W_1,c . (a_k h_k)
    Distil one vector per pseudo-bag (``distill``):
        afs      f_m = sum_k a_k h_k                        (attention feature)
        maxmins  h_k of the instances with the highest and lowest p_k,last = softmax_c(s_k)_last
        maxs     h_k of the instance with the highest p_k,last
    Tier 2: a gated-attention MIL head T_2 over the distilled vectors gives the bag logits.
    loss = L(Y, T_2) + (1/M) sum_m L(Y, y_m)            L: the task's bag loss (cross-entropy for classes)

The split is random in training (drawn from torch's seeded generator); in evaluation it is a fixed
permutation of the bag's present instances (seeded by their count), so a prediction is deterministic and
a bag alone equals it padded. Instance scores are the tier-1 attention logits (before the softmax): they
depend on the instance alone, so they rank alike across pseudo-bags and under every task. The Grad-CAM
logits, scaled by each pseudo-bag's softmax, are used only to pick the distilled instances; as a map their
mean over survival intervals did not find the target digits (instance AUROC 0.55), the attention does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import GatedAttention, MILModel, MILOutput, bag_term, embed, masked_softmax
from .registry import AttentionOptions, register


class DTFDOptions(AttentionOptions):
    groups: int = Field(4, ge=1, le=64)  # M pseudo-bags
    distill: Literal["afs", "maxmins", "maxs"] = "afs"


class DTFDMIL(MILModel):

    def __init__(self, in_dim: int, n_classes: int, o: DTFDOptions):
        super().__init__()
        self.groups, self.distill = o.groups, o.distill
        self.embed = embed(in_dim, o.hidden_dim, o.dropout)
        self.att1 = GatedAttention(o.hidden_dim, o.attention_dim, 1, gated=True)
        self.cls1 = nn.Linear(o.hidden_dim, n_classes)
        self.att2 = GatedAttention(o.hidden_dim, o.attention_dim, 1, gated=True)
        self.cls2 = nn.Linear(o.hidden_dim, n_classes)

    def _groups(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random split of n instances into min(M, n) pseudo-bags of sizes differing by at most one:
        (index [M, g], present [M, g]); group i holds perm[i::M]."""
        m = max(1, min(self.groups, n))
        gen = None if self.training else torch.Generator().manual_seed(n)
        perm = torch.randperm(n, generator=gen).to(device)
        g = -(-n // m)
        idx = torch.cat([perm, perm.new_full((m * g - n,), -1)]).reshape(g, m).T
        return idx.clamp_min(0), idx >= 0

    def _bag(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One bag's present instances [n, D] -> (bag logits [C], attention logits [n], tier-1 logits [M, C])."""
        n, c = len(h), self.cls1.out_features
        if n == 0:
            return self.cls2(h.new_zeros(h.shape[1])), h.new_zeros(0), h.new_zeros(0, c)
        idx, present = self._groups(n, h.device)
        hg = h[idx]  # [M, g, D]
        logit = self.att1(hg).squeeze(-1)
        a = masked_softmax(logit.masked_fill(~present, float("-inf")), present)
        weighted = a.unsqueeze(-1) * hg
        cam = weighted @ self.cls1.weight.T  # [M, g, C]: s_k,c = W_1,c . (a_k h_k)
        att = h.new_zeros(n).index_copy_(0, idx[present], logit[present].to(h.dtype))
        tier1 = self.cls1(weighted.sum(1))
        if self.distill == "afs":
            distilled = weighted.sum(1)
        else:
            p = torch.softmax(cam.float(), -1)[..., -1]
            top = p.masked_fill(~present, -1.0).argmax(1)
            pick = [top] if self.distill == "maxs" else [top, p.masked_fill(~present, 2.0).argmin(1)]
            distilled = torch.cat([hg[torch.arange(len(hg)), k] for k in pick])
        a2 = torch.softmax(self.att2(distilled).squeeze(-1), 0)
        return self.cls2((a2[:, None] * distilled).sum(0)), att, tier1

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        logits, scores, tier1, owner = [], [], [], []
        for b in range(x.shape[0]):
            lg, att, t1 = self._bag(h[b, mask[b]])
            full = torch.full((x.shape[1],), float("-inf"), device=x.device, dtype=att.dtype)
            full[mask[b]] = att
            logits.append(lg)
            scores.append(full)
            tier1.append(t1)
            owner += [b] * len(t1)
        return MILOutput(torch.stack(logits), torch.stack(scores),
                         {"pseudo_logits": torch.cat(tier1), "pseudo_owner": torch.tensor(owner, device=x.device)})

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        owner = output.aux["pseudo_owner"]
        tier1 = bag_term(output.aux["pseudo_logits"], target[owner], class_weight, bag_loss) if len(owner) else bag * 0
        return {"bag": bag, "tier1": tier1, "loss": bag + tier1}


@register("dtfd_mil", DTFDOptions, paper="Zhang et al. 2022, DTFD-MIL double-tier feature distillation (CVPR)")
def dtfd_mil(in_dim: int, n_classes: int, o: DTFDOptions) -> DTFDMIL:
    return DTFDMIL(in_dim, n_classes, o)
