"""`make demo`: the whole pipeline on synthetic slides the project generates itself.

Generates a small cohort (tumour-positive and negative slides, with ground truth), then runs every stage
and prints where the outputs are. ``make demo TASK=survival`` (``--task survival``): slides whose
survival time depends on their tumour burden (exponential times, about 30% censored), trained with the
survival task; it prints the c-index, the oracle c-index (the true hazard's, on the same times) and the
Kaplan-Meier log-rank p-value of the out-of-fold risk groups.
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
from wsi_mil.synthetic import make_cohort, make_survival_cohort


def stage(*argv: str) -> None:
    t0 = time.perf_counter()
    rc = cli(list(argv))
    print(f"  [{argv[0]} finished in {time.perf_counter() - t0:.1f} s, exit {rc}]")
    if rc != 0:
        sys.exit(rc)


def _rows(path: Path) -> list[dict]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))


def patch_auroc(out: Path, run: str, positives: list[str]) -> float:
    """AUROC of attention percentiles against ground-truth tumour, over the patches of tumour slides."""
    from sklearn.metrics import roc_auc_score

    from wsi_mil.formats import read_scores
    from wsi_mil.heatmap.scores import tumour_fraction
    from wsi_mil.synthetic import load_truth

    scores, truth = [], []
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


def survival_report(out: Path) -> None:
    """c-index (pooled out of fold), the oracle's (true log hazard vs the same observed times), log-rank p."""
    import numpy as np
    from sksurv.metrics import concordance_index_censored

    layout = Layout(out)
    summary = json.loads((layout.run_dir("default") / "summary.json").read_text())
    labels = {r["slide_id"]: r for r in _rows(out / "labels.csv")}
    truth = _rows(out / "survival_truth.csv")
    event = np.array([int(labels[t["slide_id"]]["event"]) == 1 for t in truth])
    time_ = np.array([float(labels[t["slide_id"]]["time"]) for t in truth])
    oracle = concordance_index_censored(event, time_, np.array([float(t["log_hazard"]) for t in truth]))[0]
    c = summary["mean_std"]["c_index"]
    positives = [t["slide_id"] for t in truth if float(t["burden"]) > 0]
    print(f"  c-index (Harrell)     : {c['mean']:.3f} ± {c['std']:.3f} over {summary['n_folds']} folds "
          f"(pooled out-of-fold {summary['pooled_out_of_fold']['c_index']:.3f})")
    print(f"  oracle c-index        : {oracle:.3f}  (the true hazard, same times and censoring)")
    print(f"  KM log-rank p         : {summary['pooled_out_of_fold']['logrank_p']:.3g}  (out-of-fold risk groups: {layout.run_dir('default') / 'km.png'})")
    print(f"  patch-level AUROC of attention vs ground-truth tumour: {patch_auroc(out, 'default', positives):.3f}")


def classification_report(out: Path) -> None:
    summary = json.loads((Layout(out).run_dir("default") / "summary.json").read_text())
    auroc = summary["mean_std"]["auroc"]
    pooled = summary["pooled_out_of_fold"]["auroc"]
    positives = [r["slide_id"] for r in _rows(out / "labels.csv") if r["label"] == "tumour"]
    print(f"  slide-level CV AUROC  : {auroc['mean']:.3f} ± {auroc['std']:.3f} over {summary['n_folds']} folds "
          f"(pooled out-of-fold {pooled:.3f})")
    print(f"  patch-level AUROC of attention vs ground-truth tumour: {patch_auroc(out, 'default', positives):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", choices=["classification", "survival"], default="classification")
    ap.add_argument("--out", type=Path, default=None, help="default demo_out (demo_out_survival for survival)")
    ap.add_argument("--slides", type=int, default=None, help="number of synthetic slides (default 12; 32 survival)")
    ap.add_argument("--encoder", default="resnet50_trunc", help="encoder preset or timm name")
    args = ap.parse_args()
    survival = args.task == "survival"
    out = args.out or Path("demo_out_survival" if survival else "demo_out")
    n = args.slides or (32 if survival else 12)
    t0 = time.perf_counter()
    print(f"generating {n} synthetic slides in {out / 'slides'} ...")
    (make_survival_cohort if survival else make_cohort)(out, n_slides=n)
    print(f"\nNOTE: the encoder is '{args.encoder}' with RANDOM, UNTRAINED weights (encoder.pretrained=false):\n"
          "      no weights can be downloaded here. With real slides, use pretrained weights from the hub\n"
          "      or a local file (encoder.weights=...).\n")
    common = ["--out", str(out), "--no-progress"]
    slides = ["--slides", str(out / "slides")]
    enc = [f"encoder.name={args.encoder}", "encoder.pretrained=false"]
    task = ["train.task=survival", "train.survival.bins=4"] if survival else []
    stage("tile", *slides, *common)
    stage("extract", *slides, *common, *enc)
    stage("train", *common, *enc, f"train.labels={out / 'labels.csv'}", "train.folds=3", "train.epochs=30",
          "train.lr=0.0005", "train.min_epochs=30", *task)
    stage("heatmap", *slides, *common, *enc, "heatmap.mpp=4")
    layout = Layout(out)
    print(f"\ndemo ({args.task}) done in {time.perf_counter() - t0:.0f} s")
    (survival_report if survival else classification_report)(out)
    first = "surv_001" if survival else "syn_001"
    print(f"  overlay PNG           : {layout.heatmap_dir('default', first) / 'overlay.png'}")
    print(f"  outputs               : {out}/{{patches,masks,features,models,heatmaps}}, {out / 'manifest.csv'}")
    exe = Path(sys.executable).parent / "wsi-mil"
    shown = os.path.relpath(exe) if exe.is_file() else "wsi-mil"
    print(f"\nsee it in the browser   : make view OUT={out}   (or: {shown} view --out {out}), then open "
          "http://127.0.0.1:8000/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
