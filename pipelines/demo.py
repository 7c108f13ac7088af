"""`make demo`: the whole pipeline on synthetic slides the project generates itself.

Generates a small cohort (tumour-positive and negative slides, with ground truth), then runs every stage
and prints where the outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from wsi_mil.cli import main as cli
from wsi_mil.layout import Layout
from wsi_mil.synthetic import make_cohort


def stage(*argv: str) -> None:
    t0 = time.perf_counter()
    rc = cli(list(argv))
    print(f"  [{argv[0]} finished in {time.perf_counter() - t0:.1f} s, exit {rc}]")
    if rc != 0:
        sys.exit(rc)


def patch_auroc(out: Path, run: str) -> float:
    """AUROC of attention percentiles against ground-truth tumour, over the patches of tumour slides."""
    import csv

    from sklearn.metrics import roc_auc_score

    from wsi_mil.formats import read_scores
    from wsi_mil.heatmap.scores import tumour_fraction
    from wsi_mil.synthetic import load_truth

    scores, truth = [], []
    with (out / "labels.csv").open() as fh:
        positives = [r["slide_id"] for r in csv.DictReader(fh) if r["label"] == "tumour"]
    for sid in positives:
        path = Layout(out).heatmap_dir(run, sid) / "scores.h5"
        if not path.exists():
            continue
        s = read_scores(path)
        mask, mask_mpp = load_truth(out / "truth", sid, "tumour")
        frac = tumour_fraction(s.coords, float(s.spec.patch_size_level0), mask, mask_mpp / s.spec.slide_mpp)
        scores += s.percentile.tolist()
        truth += (frac >= 0.5).tolist()
    return float(roc_auc_score(truth, scores)) if len(set(truth)) == 2 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--slides", type=int, default=12, help="number of synthetic slides (half tumour)")
    ap.add_argument("--encoder", default="resnet50_trunc", help="encoder preset or timm name")
    args = ap.parse_args()
    out = args.out
    t0 = time.perf_counter()
    print(f"generating {args.slides} synthetic slides in {out / 'slides'} ...")
    make_cohort(out, n_slides=args.slides)
    print(f"\nNOTE: the encoder is '{args.encoder}' with RANDOM, UNTRAINED weights (encoder.pretrained=false):\n"
          "      no weights can be downloaded here. With real slides, use pretrained weights from the hub\n"
          "      or a local file (encoder.weights=...).\n")
    common = ["--out", str(out), "--no-progress"]
    slides = ["--slides", str(out / "slides")]
    enc = [f"encoder.name={args.encoder}", "encoder.pretrained=false"]
    stage("tile", *slides, *common)
    stage("extract", *slides, *common, *enc)
    stage("train", *common, *enc, f"train.labels={out / 'labels.csv'}", "train.folds=3", "train.epochs=30",
          "train.lr=0.0005", "train.min_epochs=30")
    stage("heatmap", *slides, *common, *enc, "heatmap.mpp=4")
    layout = Layout(out)
    summary = json.loads((layout.run_dir("default") / "summary.json").read_text())
    auroc = summary["mean_std"]["auroc"]
    pooled = summary["pooled_out_of_fold"]["auroc"]
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s")
    print(f"  slide-level CV AUROC  : {auroc['mean']:.3f} ± {auroc['std']:.3f} over {summary['n_folds']} folds "
          f"(pooled out-of-fold {pooled:.3f})")
    print(f"  patch-level AUROC of attention vs ground-truth tumour: {patch_auroc(out, 'default'):.3f}")
    print(f"  overlay PNG           : {layout.heatmap_dir('default', 'syn_001') / 'overlay.png'}")
    print(f"  outputs               : {out}/{{patches,masks,features,models,heatmaps}}, {out / 'manifest.csv'}")
    exe = Path(sys.executable).parent / "wsi-mil"
    shown = os.path.relpath(exe) if exe.is_file() else "wsi-mil"
    print(f"\nsee it in the browser   : make view OUT={out}   (or: {shown} view --out {out}), then open "
          "http://127.0.0.1:8000/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
