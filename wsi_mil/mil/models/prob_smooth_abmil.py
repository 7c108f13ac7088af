"""ProbSmoothABMIL (Castro-Macías, Morales-Álvarez, Wu, Molina & Katsaggelos, "Probabilistic smooth attention
for deep multiple instance learning in medical imaging", arXiv 2507.14932, 2025; torchmil's
``ProbSmoothABMIL``, ``covar_mode='diag'``).

The attention values are a random vector f with q(f | X) = N(mu, diag(sigma^2)):

    h_k = ReLU(W x_k) ;  H = GELU(W_2 GELU(W_1 h))      W_1: D -> 2A, W_2: 2A -> 2A
    mu_k = w_mu^T H_k ;  log sigma_k^2 = w_s^T H_k
    training: S samples f^(s) = clip(mu + sigma * eps^(s), -20, 20), eps ~ N(0, I);
              z^(s) = sum_k softmax(f^(s))_k h_k ;  loss = mean_s L(Y, W_c z^(s)) + kl_weight * KL
    KL (to the smooth prior N(0, L^-1) on the grid graph, up to constants, per instance):
              KL = (1/N) [ mu^T (I - Â) mu + sum_k sigma_k^2 (1 - Â_kk) - 1/2 sum_k log sigma_k^2 ]
    evaluation: f = mu (the posterior mean; torchmil averages 5,000 samples instead, which is random).

Â is the normalised 8-neighbour grid adjacency (Â_kk = 0); the mu^T (I - Â) mu term is what makes the
attention smooth over neighbouring patches. Instance scores are mu_k.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import MILModel, MILOutput, bag_term, embed, masked_softmax, neg_inf_outside
from .graph import grid_graph, normalized_spread
from .registry import AttentionOptions, register


class ProbSmoothOptions(AttentionOptions):
    samples: int = Field(100, ge=1, le=10_000)  # S in training (torchmil: 1,000)
    kl_weight: float = Field(1.0, ge=0)


class ProbSmoothABMIL(MILModel):
    def __init__(self, in_dim: int, n_classes: int, o: ProbSmoothOptions):
        super().__init__()
        a = o.attention_dim
        self.samples, self.kl_weight = o.samples, o.kl_weight
        self.embed = embed(in_dim, o.hidden_dim, o.dropout)
        self.mlp = nn.Sequential(nn.Linear(o.hidden_dim, 2 * a), nn.GELU(), nn.Linear(2 * a, 2 * a), nn.GELU())
        self.mu = nn.Linear(2 * a, 1)
        self.log_var = nn.Linear(2 * a, 1)
        self.classifier = nn.Linear(o.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        hh = self.mlp(h)
        mu, log_var = self.mu(hh).squeeze(-1), self.log_var(hh).squeeze(-1)  # [B, N]
        mu_scores = neg_inf_outside(mu, mask)
        if not self.training:
            z = torch.einsum("bn,bnh->bh", masked_softmax(mu_scores, mask), h)
            return MILOutput(self.classifier(z), mu_scores)
        eps = torch.randn(*mu.shape, self.samples, device=mu.device, dtype=mu.dtype)
        f = (mu.unsqueeze(-1) + torch.exp(0.5 * log_var).unsqueeze(-1) * eps).clamp(-20, 20)  # [B, N, S]
        s = masked_softmax(f, mask.unsqueeze(-1), dim=1)
        samples = self.classifier(torch.einsum("bns,bnh->bsh", s, h))  # [B, S, C]
        kl = self._kl(mu, log_var, mask, coords)
        return MILOutput(samples.mean(1), mu_scores, {"sample_logits": samples, "kl": kl})

    def _kl(self, mu, log_var, mask, coords) -> torch.Tensor:
        m = mask.to(mu.dtype)
        mu, log_var = mu * m, log_var * m
        smooth = (mu * (mu - normalized_spread(mu.unsqueeze(-1), grid_graph(coords, mask)).squeeze(-1))).sum(1)
        var = (torch.exp(log_var) * m).sum(1) - 0.5 * log_var.sum(1)
        return ((smooth + var) / m.sum(1).clamp_min(1)).mean()

    def compute_loss(self, output: MILOutput, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                     bag_loss=None) -> dict:
        samples = output.aux.get("sample_logits")
        if samples is None:  # evaluation mode: the posterior mean's logits, no KL
            bag = bag_term(output.logits, target, class_weight, bag_loss)
            return {"bag": bag, "loss": bag}
        b, s, c = samples.shape
        bag = bag_term(samples.reshape(b * s, c), target.repeat_interleave(s, 0), class_weight, bag_loss)
        kl = output.aux["kl"]
        return {"bag": bag, "kl": kl, "loss": bag + self.kl_weight * kl}


@register("prob_smooth_abmil", ProbSmoothOptions,
          paper="Castro-Macías et al. 2025, Probabilistic smooth attention (arXiv 2507.14932)", uses_positions=True)
def prob_smooth_abmil(in_dim: int, n_classes: int, o: ProbSmoothOptions) -> ProbSmoothABMIL:
    return ProbSmoothABMIL(in_dim, n_classes, o)
