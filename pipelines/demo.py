"""`make demo`: the whole pipeline on synthetic slides the project generates itself.

Generates a small cohort (tumour-positive and negative slides, with ground truth), then runs every stage
and prints where the outputs are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from wsi_mil.cli import main as cli
from wsi_mil.synthetic import make_cohort


def stage(*argv: str) -> None:
    t0 = time.perf_counter()
    rc = cli(list(argv))
    print(f"  [{argv[0]} finished in {time.perf_counter() - t0:.1f} s, exit {rc}]")
    if rc != 0:
        sys.exit(rc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--slides", type=int, default=6, help="number of synthetic slides")
    args = ap.parse_args()
    out = args.out
    t0 = time.perf_counter()
    print(f"generating {args.slides} synthetic slides in {out / 'slides'} ...")
    make_cohort(out, n_slides=args.slides)
    common = ["--out", str(out), "--no-progress"]
    stage("tile", "--slides", str(out / "slides"), *common)
    print(f"\ndemo done in {time.perf_counter() - t0:.1f} s")
    print(f"  slides + ground truth : {out / 'slides'}, {out / 'truth'}, {out / 'labels.csv'}")
    print(f"  patch coordinates     : {out / 'patches'}")
    print(f"  masks and QC images   : {out / 'masks'}  (e.g. {out / 'masks' / 'syn_001.grid.png'})")
    print(f"  per-slide status      : {out / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
