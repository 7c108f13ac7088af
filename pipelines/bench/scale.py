"""scale: peak RSS with a cohort three times the bag cache, and cached vs all-in-memory throughput."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from .common import PEAK_PROBE
from .options import Options


def _rss_child(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS in GB and its stdout."""
    probe = code + PEAK_PROBE
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    peak = [line for line in out.splitlines() if line.startswith("PEAK_KB")][-1].split()[1]
    return int(peak) / 2**20, out


def _synthetic_cohort(folder: Path, n_bags: int, n_inst: int, dim: int) -> Path:
    """``n_bags`` features files (float32) and a labels CSV, written once."""
    from wsi_mil.h5io import write_h5

    labels = folder / "labels.csv"
    if labels.is_file():
        return labels
    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for i in range(n_bags):
        x = rng.standard_normal((n_inst, dim), dtype=np.float32)
        x[: n_inst // 20, :8] += 2.0 * (i % 2)
        write_h5(folder / "feats" / f"b{i:03d}.h5", {"features": x, "coords": np.zeros((n_inst, 2), np.int64)},
                 {"features": {"encoder_id": "bench", "feature_dim": dim}})
        rows.append(f"b{i:03d},{i % 2}")
    labels.write_text("\n".join(rows) + "\n")
    return labels


def run(opts: Options) -> None:
    """Peak RSS with a cohort 3x the bag cache, and cached vs the old all-in-memory throughput."""
    cache, quick = opts.cache, opts.quick
    cache_gb = 0.02 if quick else 1.0
    n_inst, dim = (2000 if quick else 8000), 1024
    n_bags = int(3 * cache_gb * 2**30 / (n_inst * dim * 4)) + 1
    folder = cache / f"scale_{n_bags}x{n_inst}"
    print(f"\n== scale: {n_bags} bags x {n_inst} x {dim} float32 = {n_bags * n_inst * dim * 4 / 2**30:.2f} GB of "
          f"features on disk, train.cache_gb={cache_gb}")
    labels = _synthetic_cohort(folder, n_bags, n_inst, dim)
    common = (f"from wsi_mil.config import load_config\nfrom wsi_mil.mil.data import load_bagset, BagCache\n"
              f"from wsi_mil.mil.train import fit\nimport time, torch\n"
              f"data = load_bagset({str(folder / 'feats')!r}, {str(labels)!r})\n")
    stream = common + (f"cfg = load_config(None, ['train.epochs=2', 'train.min_epochs=2', 'train.cache_gb={cache_gb}'])\n"
                       "h = fit(data.bags, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                       "print('EPOCH', h[-1]['seconds'])")
    peak, out = _rss_child(stream)
    epoch = float([x for x in out.splitlines() if x.startswith("EPOCH")][-1].split()[1])
    print(f"  peak RSS training (2 epochs): {peak:.2f} GB  (target <= cache + 1.5 = {cache_gb + 1.5:.2f} GB); "
          f"epoch {epoch:.1f} s streaming")
    # everything fits: the new path (cache holds all) against the old one (every bag loaded up front)
    fits = common + ("from wsi_mil.mil.data import load_features\n"
                     "cfg = load_config(None, ['train.epochs=3', 'train.min_epochs=3', 'train.cache_gb=64'])\n"
                     "old = [b.__class__(b.slide_id, load_features(b.path), b.label, b.patient_id) for b in data.bags]\n"
                     "for r in range(2):\n"
                     "    new = fit(data.bags, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                     "    ref = fit(old, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                     "    print('NEW', *[h['seconds'] for h in new[1:]]); print('OLD', *[h['seconds'] for h in ref[1:]])")
    _, out = _rss_child(fits)
    new = [float(v) for line in out.splitlines() if line.startswith("NEW") for v in line.split()[1:]]
    old = [float(v) for line in out.splitlines() if line.startswith("OLD") for v in line.split()[1:]]
    print(f"  all cached: {statistics.median(new):.2f} s/epoch vs all in memory up front "
          f"{statistics.median(old):.2f} s/epoch: throughput ratio {statistics.median(old) / statistics.median(new):.2f} "
          f"(target >= 0.9; epochs 2-3 of two interleaved rounds)")
