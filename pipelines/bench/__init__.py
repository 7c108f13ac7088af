"""`make bench`: throughput figures, measured inside this process (no interpreter start-up).

One module per section (``--only tile,extract,train,scale,heatmap,mil,view,survival,formats,spatial,fits,serve``), each a ``run(opts)``
registered in :data:`SECTIONS`; every section prints its figures and the ratios taken in one run. Large
synthetic inputs are generated once and cached under ``--cache`` (default ``.bench/``). ``--quick`` is
the smoke run ``make test`` makes (tests/test_bench.py), so no section can rot unnoticed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import extract, fits, formats, heatmap, mil, scale, serve, spatial, survival, tile, train, view
from .options import Options, from_args, parser

SECTIONS: dict[str, Callable[[Options], None]] = {
    "tile": tile.run, "extract": extract.run, "train": train.run, "scale": scale.run,
    "heatmap": heatmap.run, "mil": mil.run, "view": view.run, "survival": survival.run,
    "formats": formats.run, "spatial": spatial.run, "fits": fits.run,
    "serve": serve.run,
}


def main(argv: list[str] | None = None) -> int:
    args = parser(list(SECTIONS)).parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section '{unknown[0]}' (choose from {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    opts = from_args(args)
    opts.cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        SECTIONS[name](opts)
    return 0
