"""IIB-MIL (Ren, Hou, Liu, Zhang, Han, Ma & Liu, "IIB-MIL: Integrated instance-level and bag-level multiple
instance learning with label disambiguation for pathological image analysis", MICCAI 2023; torchmil's
``IIBMIL``).

    h_k = ReLU(W x_k) ;  H = LN(TransformerLayer(h))         context (:mod:`.transformer`)
    Bag level: a learnt query q reads the bag by multi-head cross-attention,
        e_k = q . K_k / sqrt(d) (per head) ;  u = q + W_o sum_k softmax(e)_k V_k ;  u = u + MLP(LN(u))
        logits = W_c LN(u)
    Instance level (classification), with class prototypes P_c (unit vectors, momentum ``momentum``):
        p_k = softmax(W_i H_k)                                instance classifier
        z_k = argmax_c cos(P_c, H_k), and z_k = 0 in a bag of class 0 (binary: negative bags hold
              only negative instances)                           prototype (disambiguated) label
        P_c <- normalise(m P_c + (1 - m) mean{H_k : the top-k p_k,c in bags of class c})   each step
    loss = L(Y, logits) + instance_weight * CE(p_k, z_k) over the present instances.

Departure: the paper also smooths each instance's soft label by a momentum over epochs; instances have no
identity across epochs here (bags may be subsampled), so the prototype label itself is the target. Under
tasks other than classification (survival, regression, multi-label) the instance branch has no classes
and is off: the bag loss alone. Instance scores are the bag query's cross-attention logits e_k (mean
over heads).

Not claimed to localise (``localises = False``): after self-attention every token carries the whole bag,
so the pooling attention need not point at the instances behind the label. On digits-bags its instance
AUROC is 0.52 (tests/test_mil.py setting), against the 0.9 the localising heads reach; its maps are
still drawn, as TransMIL's are.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import MILModel, MILOutput, bag_term, embed, neg_inf_outside
from .registry import MultiHeadOptions, register
from .transformer import TransformerLayer


class IIBMILOptions(MultiHeadOptions):
    instance_weight: float = Field(1.0, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    top_k: int = Field(8, ge=1)


class IIBMIL(MILModel):
    localises = False  # self-attention mixes the bag first: see the module docstring
    def __init__(self, in_dim: int, n_classes: int, o: IIBMILOptions):
        super().__init__()
        d = o.hidden_dim
        self.heads, self.instance_weight, self.momentum, self.top_k = o.heads, o.instance_weight, o.momentum, o.top_k
        self.embed = embed(in_dim, d, o.dropout)
        self.encoder = TransformerLayer(d, o.heads, o.dropout)
        self.norm = nn.LayerNorm(d)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.kv = nn.Linear(d, 2 * d)
        self.q = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.decoder_mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head_norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, n_classes)
        self.instance_classifier = nn.Linear(d, n_classes)
        self.register_buffer("prototypes", F.normalize(torch.randn(n_classes, d, generator=torch.Generator().manual_seed(0)), dim=1))

    def _decode(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        dh = d // self.heads
        k, v = (t.reshape(b, n, self.heads, dh).transpose(1, 2) for t in self.kv(h).chunk(2, -1))
        q = self.q(self.query).reshape(1, self.heads, 1, dh)
        e = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(dh)  # [B, heads, N]
        e = e.masked_fill(~mask[:, None], float("-inf"))
        w = torch.nan_to_num(torch.softmax(e, -1), nan=0.0)
        u = self.query[:, 0] + self.out((w.unsqueeze(2) @ v).squeeze(2).reshape(b, d))
        u = u + self.decoder_mlp(u)
        return self.classifier(self.head_norm(u)), neg_inf_outside(e.mean(1).nan_to_num(neginf=0.0), mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.norm(self.encoder(self.embed(x), mask))
        logits, scores = self._decode(h, mask)
        return MILOutput(logits, scores, {"instances": h, "instance_logits": self.instance_classifier(h), "mask": mask})

    @torch.no_grad()
    def _update_prototypes(self, h: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
        for c in range(self.prototypes.shape[0]):
            rows = (target == c) & mask.any(1)
            if not rows.any():
                continue
            p = probs[rows, :, c].masked_fill(~mask[rows], -1.0).reshape(-1)
            top = p.topk(min(self.top_k, int(mask[rows].sum()))).indices
            mean = h[rows].reshape(-1, h.shape[-1])[top].float().mean(0)
            self.prototypes[c] = F.normalize(self.momentum * self.prototypes[c] + (1 - self.momentum) * mean, dim=0)

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        bag = bag_term(output.logits, target, class_weight, bag_loss)
        if bag_loss is not None or self.instance_weight == 0:
            return {"bag": bag, "loss": bag}
        h, logits, mask = output.aux["instances"], output.aux["instance_logits"].float(), output.aux["mask"]
        if self.training:
            self._update_prototypes(h.detach(), torch.softmax(logits.detach(), -1), mask, target)
        with torch.no_grad():
            z = (F.normalize(h.float(), dim=-1) @ self.prototypes.T).argmax(-1)  # [B, N]
            if logits.shape[-1] == 2:
                z = torch.where(target[:, None] == 0, torch.zeros_like(z), z)
        inst = F.cross_entropy(logits[mask], z[mask]) if mask.any() else bag * 0
        return {"bag": bag, "instance": inst, "loss": bag + self.instance_weight * inst}


@register("iibmil", IIBMILOptions, paper="Ren et al. 2023, IIB-MIL instance- and bag-level MIL (MICCAI)")
def iibmil(in_dim: int, n_classes: int, o: IIBMILOptions) -> IIBMIL:
    return IIBMIL(in_dim, n_classes, o)
