"""Issue 21: bootstrap intervals and DeLong's test, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from wsi_mil.mil.intervals import bootstrap_ci, delong_test


def _delong_by_loops(y, a, b):
    """DeLong et al. (1988) written out: psi over every (positive, negative) pair, the structural
    components as row and column means, their sample covariances, the z statistic."""
    y = np.asarray(y).astype(bool)
    comps = []
    for s in (a, b):
        x, w = s[y], s[~y]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        comps.append((psi.mean(), psi.mean(1), psi.mean(0)))
    (t1, v10a, v01a), (t2, v10b, v01b) = comps
    m, n = y.sum(), (~y).sum()

    def cov(u, v):
        return ((u - u.mean()) * (v - v.mean())).sum() / (len(u) - 1)

    var = (cov(v10a, v10a) + cov(v10b, v10b) - 2 * cov(v10a, v10b)) / m \
        + (cov(v01a, v01a) + cov(v01b, v01b) - 2 * cov(v01a, v01b)) / n
    z = (t1 - t2) / math.sqrt(var)
    return t1, t2, z, 2 * (1 - norm.cdf(abs(z)))


def test_delong_agrees_with_the_pairwise_computation_and_sklearn_on_fixed_inputs():
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(23), np.zeros(31)].astype(int)
    a = np.round(y * 0.9 + rng.normal(0, 1, len(y)), 1)  # rounded: ties inside and across the classes
    b = np.round(0.6 * a + y * 0.2 + rng.normal(0, 0.8, len(y)), 1)
    got = delong_test(y, a, b)
    t1, t2, z, p = _delong_by_loops(y, a, b)
    assert got["auroc_a"] == pytest.approx(roc_auc_score(y, a)) == pytest.approx(t1)
    assert got["auroc_b"] == pytest.approx(roc_auc_score(y, b)) == pytest.approx(t2)
    assert got["z"] == pytest.approx(z, rel=1e-9) and got["p"] == pytest.approx(p, rel=1e-9)
    assert delong_test(y, a, a)["p"] == 1.0


def _auc(y, s):
    """AUROC as the Mann-Whitney U over n_pos n_neg (sklearn's value, checked below; 20x faster here)."""
    pos = y == 1
    if pos.all() or not pos.any():
        return math.nan
    ranks = rankdata(s)
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_bootstrap_intervals_cover_a_known_auroc_at_about_their_nominal_rate():
    """Binormal scores (negatives N(0, 1), positives N(d, 1)) have AUROC Phi(d / sqrt 2). Over 150 seeded
    cohorts of 60 patients, the 95% percentile interval (200 resamples over patients) covers it at
    about 95%."""
    d = 1.0
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(0)
    hits = 0
    repeats = 150
    for r in range(repeats):
        y = np.r_[np.ones(30), np.zeros(30)].astype(int)
        s = rng.normal(0, 1, 60) + d * y
        ci = bootstrap_ci(lambda i, y=y, s=s: _auc(y[i], s[i]), np.arange(60), n_boot=200, seed=r)
        hits += ci["low"] <= truth <= ci["high"]
    assert 0.89 <= hits / repeats <= 0.99, hits / repeats
    assert _auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_the_bootstrap_resamples_patients_not_slides_and_is_seeded():
    """Two slides per patient with identical scores: resampling patients keeps both slides of each, so
    every resample holds an even count of each patient; the same seed gives the same interval."""
    y = np.repeat([0, 1, 0, 1, 1, 0], 2)
    s = np.repeat([0.1, 0.8, 0.3, 0.7, 0.4, 0.6], 2)
    groups = np.repeat(np.arange(6), 2)
    sizes = []

    def metric(i):
        sizes.append(np.bincount(groups[i], minlength=6) % 2)
        return roc_auc_score(y[i], s[i]) if len(np.unique(y[i])) == 2 else math.nan

    a = bootstrap_ci(metric, groups, n_boot=50, seed=3)
    assert all((c == 0).all() for c in sizes)
    assert bootstrap_ci(metric, groups, n_boot=50, seed=3) == a and a["value"] == pytest.approx(roc_auc_score(y, s))
    assert a["low"] <= a["value"] <= a["high"] and a["n_undefined"] >= 0


@pytest.mark.parametrize("rule", ["youden", "sensitivity@0.9"])
def test_the_threshold_is_picked_on_out_of_fold_predictions_and_predict_calls_at_it(rule, tmp_path):
    """train.threshold on a binary run: summary.json's threshold is the one a brute-force search finds on
    the out-of-fold probabilities in predictions.csv (every distinct probability tried as the cut), and
    predict calls a slide positive exactly when its ensemble probability reaches it."""
    import csv as csv_module
    import json

    from test_tasks import _cohort, _run

    from wsi_mil.cli import main

    feats, labels, _ = _cohort(tmp_path, 30, lambda s, rng: {"label": "pos" if s + rng.normal(0, 0.08) > 0.25
                                                              else "neg"}, seed=11)
    rc, run = _run(tmp_path, feats, labels, "train.epochs=4", "train.min_epochs=4", f"train.threshold={rule}")
    assert rc == 0
    th = json.loads((run / "summary.json").read_text())["threshold"]
    with (run / "predictions.csv").open() as fh:
        oof = [r for r in csv_module.DictReader(fh) if r["prob_pos"]]
    y = np.array([r["label"] == "pos" for r in oof])
    p = np.array([float(r["prob_pos"]) for r in oof])
    best = None
    for t in sorted(set(p), reverse=True):  # each distinct probability as the cut, highest first
        sens, spec = (p[y] >= t).mean(), (p[~y] < t).mean()
        score = sens + spec - 1 if rule == "youden" else (sens >= 0.9) * (1 + t)
        if best is None or score > best[0] + 1e-12:
            best = (score, t)
    assert th["rule"] == rule and th["positive_class"] == "pos"
    assert th["value"] == pytest.approx(best[1], abs=1e-6)  # probabilities are written with 6 decimals
    assert th["sensitivity"] == pytest.approx((p[y] >= th["value"] - 1e-6).mean(), abs=0.05)
    out = run.parents[1]
    assert main(["predict", "--out", str(out), "--no-progress", "--features", str(feats), "--model", str(run)]) == 0
    with (out / "predictions" / "default.csv").open() as fh:
        rows = list(csv_module.DictReader(fh))
    calls = {r["pred"] == "pos" for r in rows}
    assert calls == {True, False} or len(rows) < 3
    assert all((r["pred"] == "pos") == (float(r["prob_pos"]) >= th["value"] - 1e-6) for r in rows)
