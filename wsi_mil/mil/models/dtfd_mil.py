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
a bag alone equals it padded. A batch's bags are split one by one (the same random stream as bag by bag)
and then scored together, their pseudo-bags padded to the batch's largest. Instance scores are the tier-1 attention logits (before the softmax): they
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

    def _split(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every bag's pseudo-bags at once: (rows [B, M, g] into the padded bag, present [B, M, g], valid
        [B, M]). Bag b's split is :meth:`_groups` of its n_b present instances (drawn in bag order, so the
        random stream is the per-bag one); pseudo-bags past its own min(M, n_b) are empty and not valid."""
        n = mask.sum(1).tolist()
        splits = [self._groups(k, mask.device) if k else None for k in n]
        m = max((s[0].shape[0] for s in splits if s is not None), default=1)
        g = max((s[0].shape[1] for s in splits if s is not None), default=1)
        rows = mask.new_zeros((len(n), m, g), dtype=torch.long)
        present = mask.new_zeros((len(n), m, g))
        for b, split in enumerate(splits):
            if split is None:
                continue
            idx, ok = split
            where = mask[b].nonzero().squeeze(1)  # present instance j is padded row where[j]
            rows[b, : idx.shape[0], : idx.shape[1]] = where[idx]
            present[b, : idx.shape[0], : idx.shape[1]] = ok
        return rows, present, present.any(-1)

    def _distil(self, hg: torch.Tensor, weighted: torch.Tensor, present: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One vector per pseudo-bag [B, M', D] (M' = 2M for maxmins) and which of them are valid."""
        if self.distill == "afs":
            return weighted.sum(2), valid
        cam = weighted @ self.cls1.weight.T  # [B, M, g, C]: s_k,c = W_1,c . (a_k h_k)
        p = torch.softmax(cam.float(), -1)[..., -1]
        pick = [p.masked_fill(~present, -1.0).argmax(-1)]
        if self.distill == "maxmins":
            pick.append(p.masked_fill(~present, 2.0).argmin(-1))
        chosen = [hg.gather(2, k[..., None, None].expand(-1, -1, 1, hg.shape[-1])).squeeze(2) for k in pick]
        return torch.cat(chosen, 1), valid.repeat(1, len(pick))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        if x.shape[1] == 0:  # no instance slots at all: one absent slot gives the pseudo-bags a row to index
            out = self.forward(x.new_zeros(x.shape[0], 1, x.shape[2]), mask.new_zeros(mask.shape[0], 1))
            return MILOutput(out.logits, out.instance_scores[:, :0], out.aux)
        h = self.embed(x)
        rows, present, valid = self._split(mask)
        batch = torch.arange(len(h), device=h.device)[:, None, None]
        hg = h[batch, rows]  # [B, M, g, D]
        logit = self.att1(hg).squeeze(-1)
        a = masked_softmax(logit, present)
        weighted = a.unsqueeze(-1) * hg
        tier1 = self.cls1(weighted.sum(2))[valid]  # [sum_b M_b, C], bag-major as pseudo_owner
        distilled, ok = self._distil(hg, weighted, present, valid)
        a2 = masked_softmax(self.att2(distilled).squeeze(-1), ok)
        logits = self.cls2((a2.unsqueeze(-1) * distilled).sum(1))
        scores = torch.full(mask.shape, float("-inf"), device=x.device, dtype=logit.dtype)
        scores[batch.expand_as(rows)[present], rows[present]] = logit[present]
        owner = batch[:, :, 0].expand_as(valid)[valid]
        return MILOutput(logits, scores, {"pseudo_logits": tier1, "pseudo_owner": owner})

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        owner = output.aux["pseudo_owner"]
        tier1 = bag_term(output.aux["pseudo_logits"], target[owner], class_weight, bag_loss) if len(owner) else bag * 0
        return {"bag": bag, "tier1": tier1, "loss": bag + tier1}


@register("dtfd_mil", DTFDOptions, paper="Zhang et al. 2022, DTFD-MIL double-tier feature distillation (CVPR)")
def dtfd_mil(in_dim: int, n_classes: int, o: DTFDOptions) -> DTFDMIL:
    return DTFDMIL(in_dim, n_classes, o)
