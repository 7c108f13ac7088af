"""The presets as a table: ``wsi-mil encoders`` prints it, and the README carries the same rows (a test
keeps them equal). The feature width is measured by a forward pass on the meta device (no weights)."""

from __future__ import annotations

from functools import lru_cache

import torch

from ...config import EncoderConfig
from .build import build_encoder
from .extras import EXTRAS
from .registry import PRESETS

COLUMNS = ("name", "dim", "native tile", "transform", "pooling", "weight formats", "licence", "hub id (gated)")


@lru_cache(maxsize=1)  # one build per process: the CLI, the README check and the docs share it
def preset_rows() -> tuple[tuple[str, ...], ...]:
    rows = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        with torch.device("meta"):
            dim = build_encoder(EncoderConfig(name=name, pretrained=False)).dim
        t = p.transform
        rows.append((name, str(dim), f"{p.tile_px} px @ {p.mpp:g} µm/px",
                     f"resize {t.resize} {t.interpolation}, crop {t.crop}",
                     p.pooling,
                     ", ".join(p.formats), p.licence or "-",
                     (p.hub or (p.hub_file[0] if p.hub_file else "-")).removeprefix("hf-hub:")))
    return tuple(rows)


def extra_rows() -> list[tuple[str, ...]]:
    """The optional extras: their width needs their package, so it is not measured here."""
    return [(name, p.pooling, f"{p.tile_px} px @ {p.mpp:g} µm/px", p.licence, f"`{install}`")
            for name, (p, _, install) in sorted(EXTRAS.items())]


def markdown_extras() -> str:
    lines = ["| extra | feature | native tile | licence | needs |", "|---|---|---|---|---|"]
    lines += [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in extra_rows()]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"`{c}`" if i in (0, 7) and c != "-" else c for i, c in enumerate(row)) + " |"
              for row in preset_rows()]
    return "\n".join(lines) + "\n"


def text_table() -> str:
    rows = [COLUMNS, *preset_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"
    extras = "".join(f"  {r[0]}: {r[1]}, {r[2]}; needs {r[4].strip('`')}\n" for r in extra_rows())
    return table + "\noptional extras (built by their authors' package, not installed by wsi_mil):\n" + extras
