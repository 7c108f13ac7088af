"""CLAM (Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide
images", Nature Biomedical Engineering 2021).

    h_k   = ReLU(W_1 x_k)                                             embedding
    a_k,c = w_c^T (tanh(V h_k) * sigm(U h_k))                        gated attention, one branch (SB) or
                                                                      one per class (MB)
    z_c   = sum_k softmax_k(a_.,c) h_k                               per-branch bag representation
    logits: SB  W_c z ;  MB  s_c = w_c^T z_c  (one scorer per class on its own branch)

Instance-level clustering: in each bag, the ``k_sample`` most attended instances of the true class's
branch are pseudo-labelled positive and the ``k_sample`` least attended negative, and a per-class
instance classifier (``W_inst,c``: 2 outputs) is trained on them (``instance_loss``: ``ce`` or the smooth
top-1 SVM of Berrada et al. 2018). With ``subtyping``, the most attended instances of every other class's
branch are also pseudo-labelled negative for that class. Loss:
``bag_weight * CE(bag) + (1 - bag_weight) * instance loss``.

Instance scores: the attention logits a_k (SB: [B, N]; MB: [B, C, N], one map per class).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import GatedAttention, MILModel, MILOutput, bag_term, embed, masked_softmax, neg_inf_outside
from .registry import AttentionOptions, register


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 SVM loss (Berrada, Zisserman & Kumar, ICLR 2018):
    tau * log sum_j exp((alpha * [j != y] + s_j - s_y) / tau), averaged over the batch."""
    margin = alpha * (1 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    s_y = logits.gather(1, target[:, None])
    return (tau * torch.logsumexp((margin + logits - s_y) / tau, dim=1)).mean()


class CLAM(MILModel):
    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, multi_branch: bool = False, k_sample: int = 8, bag_weight: float = 0.7,
                 instance_loss: str = "ce", subtyping: bool = False):
        super().__init__()
        if instance_loss not in ("ce", "svm"):
            raise ValueError("instance_loss must be 'ce' or 'svm'")
        self.per_class = multi_branch
        self.n_classes, self.k_sample, self.bag_weight = n_classes, k_sample, bag_weight
        self.instance_loss, self.subtyping = instance_loss, subtyping
        self.embed = embed(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, n_classes if multi_branch else 1, True, dropout)
        if multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(n_classes))
        else:
            self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        att = neg_inf_outside(self.attention(h).transpose(1, 2), mask)  # [B, K, N]
        z = masked_softmax(att, mask.unsqueeze(1)) @ h  # [B, K, H]
        if self.per_class:
            logits = torch.cat([clf(z[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)
        else:
            logits = self.classifier(z[:, 0])
        scores = att if self.per_class else att[:, 0]
        return MILOutput(logits, scores, {"h": h, "att": att, "mask": mask})

    def _instance_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.instance_loss == "svm":
            return smooth_top1_svm(logits, labels)
        return F.cross_entropy(logits, labels)

    def clustering_loss(self, aux: dict, target: torch.Tensor) -> torch.Tensor:
        h, att, mask = aux["h"], aux["att"], aux["mask"]
        losses = []
        for b in range(len(target)):
            valid = mask[b]
            n = int(valid.sum())
            k = min(self.k_sample, n // 2)
            if k < 1:
                continue
            whole = n == valid.numel()  # a bag without padding: views, not a copy of its (N, H) embeddings
            hb = h[b] if whole else h[b, valid]
            for c in range(self.n_classes):
                a = att[b, c if self.per_class else 0]
                a = a if whole else a[valid]
                top = torch.topk(a, k).indices
                if c == int(target[b]):
                    bottom = torch.topk(-a, k).indices
                    idx = torch.cat([top, bottom])
                    labels = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                elif self.subtyping:
                    idx, labels = top, torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                clf = self.instance_classifiers[c]  # in the classifier's dtype: h is bf16 under autocast
                losses.append(self._instance_loss(clf(hb[idx].to(clf.weight.dtype)).float(), labels))
        return torch.stack(losses).mean() if losses else h.sum() * 0.0

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        """Under a task other than classification (``bag_loss`` given) the instance-clustering term has no
        class to pick the in-class branch with: it is off, and the loss is the task's bag loss alone."""
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        if bag_loss is not None:
            return {"bag": bag, "loss": bag}
        inst = self.clustering_loss(output.aux, target)
        return {"bag": bag, "instance": inst, "loss": self.bag_weight * bag + (1 - self.bag_weight) * inst}


class CLAMOptions(AttentionOptions):
    k_sample: int = Field(8, ge=1)  # instances sampled per side for the clustering loss
    bag_weight: float = Field(0.7, ge=0, le=1)  # loss = w * bag + (1 - w) * instance
    instance_loss: Literal["ce", "svm"] = "ce"  # svm: the smooth top-1 SVM loss of the reference code
    subtyping: bool = False


def _clam(multi_branch: bool):
    def build(in_dim: int, n_classes: int, o: CLAMOptions) -> CLAM:
        return CLAM(in_dim, n_classes, o.hidden_dim, o.attention_dim, o.dropout, multi_branch, o.k_sample,
                    o.bag_weight, o.instance_loss, o.subtyping)
    return build


register("clam_sb", CLAMOptions, paper="Lu et al. 2021, CLAM single-branch (Nat. Biomed. Eng.)")(_clam(False))
register("clam_mb", CLAMOptions, paper="Lu et al. 2021, CLAM multi-branch (Nat. Biomed. Eng.)")(_clam(True))
