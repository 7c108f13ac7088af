"""Issue 21: `wsi-mil evaluate`, a run trained on one synthetic cohort applied to a second one made by the
demo's generator with another seed (classification and survival), every figure checked against a
recomputation from the files it wrote."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import SMALL_ENCODER

from wsi_mil.cli import main
from wsi_mil.synthetic import make_cohort, make_survival_cohort


def _study(root, make, seed, n):
    """A cohort from the demo's generator, tiled and extracted; returns (labels CSV, features dir)."""
    make(root, n_slides=n, width=1536, height=1536, seed=seed)
    out = root / "out"
    for stage in ("tile", "extract"):
        assert main([stage, "--slides", str(root / "slides"), "--out", str(out), "--no-progress", *SMALL_ENCODER]) == 0
    return root / "labels.csv", out / "features" / "resnet18", out


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    labels_a, _, out = _study(root / "a", make_cohort, 0, 8)
    labels_b, feats_b, _ = _study(root / "b", make_cohort, 1, 8)
    assert main(["train", "--out", str(out), "--no-progress", *SMALL_ENCODER, f"train.labels={labels_a}", "train.folds=2",
                 "train.epochs=6", "train.min_epochs=6", "train.val_fraction=0", "train.threshold=youden",
                 "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    return out, labels_b, feats_b


def _evaluate(out, labels, feats, *extra):
    return main(["evaluate", "--out", str(out), "--no-progress", "--labels", str(labels), "--features", str(feats),
                 "--name", "cohort_b", "evaluate.bootstrap=200", *extra])


def test_evaluate_a_classification_run_on_another_cohort(classification):
    from sklearn.metrics import brier_score_loss, roc_auc_score

    out, labels, feats = classification
    assert _evaluate(out, labels, feats) == 0
    folder = out / "evaluations" / "default" / "cohort_b"
    summary = json.loads((folder / "metrics.json").read_text())
    rows = _rows(folder / "predictions.csv")
    truth = _rows(labels)
    scored = sorted(r["slide_id"] for r in truth if r["slide_id"] not in summary["skipped"]["no_patches"])
    assert sorted(r["slide_id"] for r in rows) == scored and len(rows) >= 6
    y = np.array([r["label"] == "tumour" for r in rows])
    p = np.array([float(r["prob_tumour"]) for r in rows])
    m = summary["metrics"]
    assert set(m) == {"auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "brier"}
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=1e-5)
    for v in m.values():
        assert v["n_boot"] == 200 and (v["low"] is None or v["low"] - 1e-9 <= v["value"] <= v["high"] + 1e-9)
    threshold = json.loads((out / "models" / "default" / "summary.json").read_text())["threshold"]["value"]
    assert summary["threshold"] == pytest.approx(threshold)
    assert all((r["pred"] == "tumour") == (float(r["prob_tumour"]) >= threshold - 1e-6) for r in rows)
    bins = np.minimum((p * 10).astype(int), 9)  # the ECE recomputed from the written probabilities
    ece = sum((bins == b).mean() * abs(y[bins == b].mean() - p[bins == b].mean()) for b in range(10) if (bins == b).any())
    assert summary["ece"] == pytest.approx(ece, abs=1e-5)
    for png in ("roc", "pr", "calibration", "confusion"):
        assert (folder / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    again = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert _evaluate(out, labels, feats) == 0  # seeded: the same intervals again
    assert json.loads((folder / "metrics.json").read_text())["metrics"] == again


def test_a_cohort_of_one_class_has_a_sensitivity_and_null_for_what_is_undefined(classification, tmp_path, capsys):
    """An all-tumour cohort (a positives-only validation set): AUROC, balanced accuracy and specificity are
    undefined and written as null (metrics.json is strict JSON, no NaN); sensitivity needs only positives,
    so it is reported, equal to sklearn's recall on the written predictions."""
    from sklearn.metrics import recall_score

    out, labels, feats = classification
    rows = _rows(labels)
    with (tmp_path / "tumour.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["label"] == "tumour")
    assert _evaluate(out, tmp_path / "tumour.csv", feats, "--name", "tumour_only") == 0
    assert "auroc undefined" in capsys.readouterr().out
    folder = out / "evaluations" / "default" / "tumour_only"

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    m = json.loads((folder / "metrics.json").read_text(), parse_constant=refuse)["metrics"]
    assert all(m[k]["value"] is None and m[k]["n_undefined"] == 200 for k in ("auroc", "balanced_accuracy", "specificity"))
    written = _rows(folder / "predictions.csv")
    assert {r["label"] for r in written} == {"tumour"}
    truth, pred = [r["label"] for r in written], [r["pred"] for r in written]
    assert m["sensitivity"]["value"] == pytest.approx(recall_score(truth, pred, pos_label="tumour"))
    assert m["sensitivity"]["n_undefined"] == 0 and m["sensitivity"]["low"] is not None


def test_a_cohort_with_a_class_the_run_never_saw_is_one_line(classification, tmp_path, capsys):
    out, labels, feats = classification
    text = labels.read_text().replace(",normal,", ",grade3,", 1)
    (tmp_path / "other.csv").write_text(text)
    assert _evaluate(out, tmp_path / "other.csv", feats) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grade3" in err[0] and err[0].startswith("error:")


def test_evaluate_a_survival_run_on_another_cohort(tmp_path):
    from sksurv.metrics import concordance_index_censored

    labels_a, _, out = _study(tmp_path / "a", make_survival_cohort, 0, 8)
    labels_b, feats_b, _ = _study(tmp_path / "b", make_survival_cohort, 1, 8)
    assert main(["train", "--out", str(out), "--no-progress", *SMALL_ENCODER, f"train.labels={labels_a}",
                 "train.folds=2", "train.epochs=4", "train.min_epochs=4", "train.val_fraction=0", "train.task=survival",
                 "train.survival.loss=cox", "train.batch_size=4", "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    assert _evaluate(out, labels_b, feats_b) == 0
    folder = out / "evaluations" / "default" / "cohort_b"
    summary = json.loads((folder / "metrics.json").read_text())
    rows = _rows(folder / "predictions.csv")
    event = np.array([r["event"] == "1" for r in rows])
    time = np.array([float(r["time"]) for r in rows])
    risk = np.array([float(r["risk"]) for r in rows])
    c = summary["metrics"]["c_index"]
    assert c["value"] == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-5)
    assert c["low"] <= c["value"] <= c["high"] and summary["task"] == "survival"
    assert 0 <= summary["logrank_p"] <= 1 and (folder / "km.png").read_bytes()[:4] == b"\x89PNG"
