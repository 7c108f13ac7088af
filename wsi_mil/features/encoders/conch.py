"""CONCH v1.5 (Mahmood Lab; hf MahmoodLab/conchv1_5, CC-BY-NC-ND-4.0; the patch encoder of TITAN, Ding et al.,
arXiv 2411.19666): the vision tower of the CONCH v1.5 vision-language model, restated from its published
recipe.

- Trunk: ViT-L/16 (1024-d, 24 blocks, 16 heads, MLP ratio 4, LayerScale), built on a 224-px grid. Run at
  448 px, the class-and-patch position embedding is interpolated as DINO/iBOT do it: bicubic, with the
  scale factor ``(28 + 0.1) / 14`` (not a target size). A published ``pos_embed`` of another grid is first
  resampled to 14 x 14 (bilinear, no antialias), as the authors' loader does.
- Pooling: the contrastive attentional pooler (one learned query, 8 heads, 768-d, over every token after
  the trunk's final norm), then ``ln_contrast``; no projection, no L2 normalisation: 768-d.
- Tiles: 512 px at 20x (0.5 µm/px), as TITAN extracts them; Resize(448) bilinear + CenterCrop(448);
  ImageNet normalisation.
- Weights: ``pytorch_model_vision.bin`` (keys ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import IMAGENET, Preset, Transform, register


class AttentionalPooler(nn.Module):
    """Cross-attention of ``n_queries`` learned queries over the tokens (CoCa's pooler, as CONCH uses it)."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads, self.dim_head = n_head, d_model // n_head
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


def dino_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The class + patch position embedding for a ``grid_h`` x ``grid_w`` patch grid, interpolated as DINO
    and iBOT do (bicubic, scale factor with the +0.1 offset)."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = patches.shape[-1]
    patches = F.interpolate(patches.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                            scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class ConchV15(nn.Module):
    """The CONCH v1.5 vision tower: a timm ViT-L/16 trunk, DINO position interpolation, attentional pooler."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler()
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        patches = t.patch_embed.proj(x)  # B, C, H/16, W/16
        b, c, gh, gw = patches.shape
        tokens = torch.cat([t.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = t.norm(t.blocks(t.norm_pre(tokens + dino_pos_embed(t.pos_embed, gh, gw))))
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def fit_pos_embed(model: nn.Module, state: dict) -> dict:
    """A published ``trunk.pos_embed`` of another grid, resampled to the trunk's 14 x 14 (bilinear, no
    antialias), as the authors' loader does before ``load_state_dict``."""
    from timm.layers import resample_abs_pos_embed

    key, own = "trunk.pos_embed", model.trunk.pos_embed
    if key in state and state[key].ndim == 3 and state[key].shape[1] != own.shape[1]:
        state = {**state, key: resample_abs_pos_embed(state[key], new_size=model.trunk.patch_embed.grid_size,
                                                      num_prefix_tokens=1, interpolation="bilinear",
                                                      antialias=False, verbose=False)}
    return state


register(Preset(
    "conch_v15", "vit_large_patch16_224", None, {"img_size": 224, "init_values": 1.0}, *IMAGENET,
    tile_px=512, transform=Transform(448, 448, "bilinear"),
    pooling="attentional pooler (1 query) + LayerNorm, 768-d", formats=("conch",),
    hub_file=("MahmoodLab/conchv1_5", "pytorch_model_vision.bin"), build=ConchV15, adapt=fit_pos_embed,
    citation="Ding et al., arXiv 2411.19666 (TITAN; CONCH v1.5 model card)", licence="CC-BY-NC-ND-4.0",
    note="CONCH v1.5 ViT-L/16 vision tower at 448 px (its pytorch_model_vision.bin is fetched from "
         "MahmoodLab/conchv1_5; gated)"))
