"""The patches' grid as a graph, for heads that use positions (``forward(..., coords)``).

``coords`` are grid cells [B, N, 2] (col, row), read from the patch grid (``grid_index``), never pixel
distances that depend on the scan. Two patches are neighbours when their cells touch (the
8-neighbourhood: Chebyshev distance 1). The graph depends only on differences of cells, so a translated
grid gives the same graph (the heads are translation invariant by construction, and tested so). With
``coords=None`` (bags with no positions, e.g. the classical MIL data sets) every instance stands alone:
no edges.

A :class:`GridGraph` holds the edges of the whole batch on flat indices ``b * N + i``; each bag's edges are
cached by its cells (the last 256 bags), so a bag seen every epoch builds its neighbourhood once, whatever
batch it lands in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

OFFSETS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
_CACHE: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
CACHE_SIZE = 256


@dataclass(frozen=True)
class GridGraph:
    src: torch.Tensor  # [E] flat index of the node receiving the message
    dst: torch.Tensor  # [E] flat index of its neighbour
    size: int  # B * N
    degree: torch.Tensor  # [B * N] float, neighbours of each node (0 for padding)
    _matrices: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device) -> GridGraph:
        if self.src.device == torch.device(device):
            return self
        return GridGraph(self.src.to(device), self.dst.to(device), self.size, self.degree.to(device))

    def matrix(self, normalized: bool, dtype: torch.dtype) -> torch.Tensor:
        """A (``normalized``: Â = D^-1/2 A D^-1/2) as a sparse [B*N, B*N] matrix, built once per graph."""
        key = (normalized, dtype)
        if key not in self._matrices:
            if normalized:
                inv = self.degree.to(dtype).clamp_min(1).rsqrt()
                weights = inv[self.src] * inv[self.dst]
            else:
                weights = torch.ones(len(self.src), dtype=dtype, device=self.src.device)
            index = torch.stack([self.src, self.dst])
            self._matrices[key] = torch.sparse_coo_tensor(index, weights, (self.size, self.size),
                                                          check_invariants=False).coalesce()
        return self._matrices[key]


def grid_graph(coords: torch.Tensor | None, mask: torch.Tensor) -> GridGraph:
    """The 8-neighbourhood graph of the present instances of each bag (padding has no edges). Each bag's
    edges come from :func:`bag_edges` (cached by the bag's cells), so a batch only offsets them."""
    b, n = mask.shape
    if coords is None or not mask.any():
        empty = torch.zeros(0, dtype=torch.long, device=mask.device)
        return GridGraph(empty, empty, b * n, torch.zeros(b * n, device=mask.device))
    c, m = coords.detach().to("cpu", torch.long), mask.detach().cpu()
    src, dst = [], []
    for i in range(b):
        slots = torch.nonzero(m[i]).squeeze(1)
        s, d = bag_edges(c[i, slots])
        src.append(slots[s] + i * n)
        dst.append(slots[d] + i * n)
    src, dst = torch.cat(src), torch.cat(dst)
    degree = torch.zeros(b * n).index_add_(0, src, torch.ones(len(src)))
    return GridGraph(src.to(mask.device), dst.to(mask.device), b * n, degree.to(mask.device))


def bag_edges(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag's (M, 2) cells -> (src, dst) index pairs of touching cells, cached by content (last 256 bags)."""
    key = hashlib.blake2b(cells.numpy().tobytes(), digest_size=16).digest()
    hit = _CACHE.get(key)
    if hit is None:
        hit = _edges(cells)
        _CACHE[key] = hit
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def _edges(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(cells) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rel = cells - cells.min(0).values + 1  # from the bag's corner: keys stay small, translation cannot matter
    side = int(rel.max()) + 2
    keys = rel[:, 0] * side + rel[:, 1]
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    src, dst = [], []
    for dx, dy in OFFSETS:
        want = keys + dx * side + dy
        pos = torch.searchsorted(sorted_keys, want).clamp_max(len(keys) - 1)
        hit = sorted_keys[pos] == want
        src.append(torch.nonzero(hit).squeeze(1))
        dst.append(order[pos[hit]])
    return torch.cat(src), torch.cat(dst)


def normalized_spread(h: torch.Tensor, graph: GridGraph) -> torch.Tensor:
    """Â h with Â = D^-1/2 A D^-1/2, the symmetric normalised adjacency (rows of isolated nodes are 0)."""
    if len(graph.src) == 0:
        return torch.zeros_like(h)
    return torch.sparse.mm(graph.matrix(True, h.dtype), h.reshape(graph.size, -1)).reshape(h.shape)


def neighbour_sum(h: torch.Tensor, graph: GridGraph) -> torch.Tensor:
    """A h: the sum over each node's neighbours (unnormalised)."""
    if len(graph.src) == 0:
        return torch.zeros_like(h)
    return torch.sparse.mm(graph.matrix(False, h.dtype), h.reshape(graph.size, -1)).reshape(h.shape)


class Sm(nn.Module):
    """The smooth operator of Castro-Macías et al., "Sm: enhanced localization in Multiple Instance Learning
    for medical imaging classification", NeurIPS 2024:

        Sm(U) = argmin_G  alpha/(1-alpha) * tr(G^T L G) + ||G - U||^2 = (1 - alpha) (I - alpha Â)^-1 U,

    with L = I - Â the normalised Laplacian of the grid graph, approximated by T fixed-point steps

        G_0 = U,   G_t = alpha Â G_{t-1} + (1 - alpha) U.

    ``alpha`` in (0, 1) is learnt as alpha = 1 / (1 + c), c > 0 (c = 1, alpha = 0.5 at the start), or
    fixed. An isolated instance (no neighbours, or ``coords=None``) keeps (1 - alpha) U: the same scale
    for every instance of a bag without edges, so its attention ranks as without the operator.
    """

    def __init__(self, alpha: float | None = None, steps: int = 10):
        super().__init__()
        self.steps = steps
        self.fixed = alpha
        self.coef = nn.Parameter(torch.tensor(1.0)) if alpha is None else None

    def alpha(self, dtype=torch.float32) -> torch.Tensor:
        if self.coef is None:
            return torch.tensor(float(self.fixed), dtype=dtype)
        return 1.0 / (1.0 + self.coef.abs().to(dtype))

    def forward(self, u: torch.Tensor, graph: GridGraph) -> torch.Tensor:
        alpha = self.alpha(u.dtype).to(u.device)
        g = u
        for _ in range(self.steps):
            g = alpha * normalized_spread(g, graph) + (1 - alpha) * u
        return g
