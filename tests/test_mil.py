import csv
import json

import h5py
import numpy as np
import pytest
import torch

from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.checkpoint import check_compatible, load_checkpoint
from wsi_mil.mil.data import load_bagset
from wsi_mil.mil.digits import digits_bags, evaluate
from wsi_mil.mil.models import MODELS, create_model
from wsi_mil.mil.splits import kfold_splits
from wsi_mil.mil.train import fit, predict_bags
from wsi_mil.runner import read_manifest


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_follows_the_contract_and_ignores_padding(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=3, hidden_dim=8, attention_dim=4, dropout=0.0).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    logits, att = model(x, mask)
    assert logits.shape == (2, 3) and att.shape == (2, 7)
    assert torch.isneginf(att[1, 4:]).all() and torch.isfinite(att[mask]).all()
    x2 = x.clone()
    x2[1, 4:] = 1e3  # garbage in padded slots changes nothing
    logits2, att2 = model(x2, mask)
    torch.testing.assert_close(logits, logits2)
    # the same bag alone, unpadded, gives the same output
    alone, att_alone = model(x[1:, :4], mask[1:, :4])
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att[1, :4], att_alone[0], atol=1e-5, rtol=1e-5)


def test_gated_attention_is_tanh_times_sigmoid():
    torch.manual_seed(0)
    m = create_model("abmil_gated", 6, 2, hidden_dim=5, attention_dim=3, dropout=0.0).eval()
    x = torch.randn(1, 4, 6)
    _, att = m(x, torch.ones(1, 4, dtype=torch.bool))
    h = m.embed(x)
    expected = m.w(torch.tanh(m.V(h)) * torch.sigmoid(m.U(h))).squeeze(-1)
    torch.testing.assert_close(att, expected)
    assert create_model("abmil", 6, 2).U is None


def test_digits_bags_bag_and_instance_auroc():
    """The MNIST-bags experiment of Ilse et al. on sklearn's digits (small version; full one in make bench)."""
    train, test, inst = digits_bags(n_train=200, n_test=80, seed=0)
    cfg = load_config(None, ["model.hidden_dim=64", "model.attention_dim=32", "model.dropout=0.0",
                             "train.epochs=30", "train.lr=0.002", "train.batch_size=8"])
    n_val = 40
    res = fit(train[n_val:], train[:n_val], 64, 2, cfg.model, cfg.train, seed=0)
    bag_auc, instance_auc = evaluate(res.model, test, inst)
    assert bag_auc >= 0.95
    assert instance_auc >= 0.9


def test_training_is_deterministic_for_a_seed():
    train, test, _ = digits_bags(n_train=40, n_test=10, seed=1)
    cfg = load_config(None, ["model.hidden_dim=16", "model.attention_dim=8", "train.epochs=3", "train.min_epochs=3",
                             "train.max_instances=6"])
    a = predict_bags(fit(train, [], 64, 2, cfg.model, cfg.train, seed=5).model, test)[0]
    b = predict_bags(fit(train, [], 64, 2, cfg.model, cfg.train, seed=5).model, test)[0]
    c = predict_bags(fit(train, [], 64, 2, cfg.model, cfg.train, seed=6).model, test)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_folds_are_grouped_by_patient_and_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 2)  # two slides per patient
    y = np.repeat(rng.integers(0, 2, 30), 2)
    splits = kfold_splits(y, groups, folds=5, val_fraction=0.2, seed=0)
    assert len(splits) == 5
    tests = np.concatenate([te for _, _, te in splits])
    assert sorted(tests) == list(range(60))  # every slide tested once
    for tr, va, te in splits:
        pt, pv, pe = set(groups[tr]), set(groups[va]), set(groups[te])
        assert not (pt & pv) and not (pt & pe) and not (pv & pe)
        assert len(va) > 0 and set(y[te]) == {0, 1}


def _write_features(folder, slide_id, feats, encoder="toy_enc", attrs=True):
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as fh:
        ds = fh.create_dataset("features", data=feats.astype(np.float32))
        fh.create_dataset("coords", data=np.zeros((len(feats), 2), np.int64))
        if attrs:
            ds.attrs["encoder_id"] = encoder


@pytest.fixture()
def feature_cohort(tmp_path):
    """20 slides from 10 patients; positive bags hold a few shifted instances. Written like another tool would."""
    rng = np.random.default_rng(0)
    feats_dir = tmp_path / "feats"
    rows = []
    for i in range(20):
        label = "tumour" if (i // 2) % 2 else "normal"
        f = rng.normal(0, 1, (int(rng.integers(20, 40)), 12))
        if label == "tumour":
            f[:5, :3] += 3.0
        _write_features(feats_dir, f"s{i:02d}", f, attrs=False)
        rows.append({"slide_id": f"s{i:02d}", "label": label, "patient_id": f"P{i // 2}"})
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["slide_id", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    return feats_dir, labels


def test_train_cli_writes_a_complete_run_and_predict_uses_the_ensemble(feature_cohort, tmp_path):
    feats, labels = feature_cohort
    out = tmp_path / "out"
    args = ["train", "--out", str(out), "--no-progress", f"train.labels={labels}", f"train.features={feats}",
            "train.folds=3", "train.epochs=15", "model.hidden_dim=16", "model.attention_dim=8", "train.lr=0.005"]
    assert main(args) == 0
    run = out / "models" / "default"
    for name in ("fold_0.safetensors", "fold_2.safetensors", "splits.csv", "predictions.csv", "history.csv",
                 "curves.png", "summary.json", "label_map.json", "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_folds"] == 3 and summary["encoder_id"] == "feats" and summary["feature_dim"] == 12
    assert summary["mean_std"]["auroc"]["mean"] >= 0.8
    assert json.loads((run / "label_map.json").read_text()) == {"normal": 0, "tumour": 1}
    with (run / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 20 and all(p["prob_tumour"] for p in preds)  # out-of-fold for every slide
    with (run / "splits.csv").open() as fh:
        splits = list(csv.DictReader(fh))
    for fold in "012":
        sides = {}
        for r in splits:
            if r["fold"] == fold:
                sides.setdefault(r["split"], set()).add(r["patient_id"])
        assert not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
    model, meta = load_checkpoint(run / "fold_0.safetensors")
    assert meta.feature_dim == 12 and meta.encoder_id == "feats" and meta.config["model"]["name"] == "abmil_gated"
    with pytest.raises(WsiMilError, match="trained on 12-d features from 'feats'"):
        check_compatible(meta, 1024, "resnet50_trunc", "x.h5")
    assert main(["predict", "--out", str(out), "--features", str(feats), "--no-progress"]) == 0
    with (out / "predictions" / "default.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20 and {r["pred"] for r in rows} <= {"normal", "tumour"}
    other = tmp_path / "other"
    _write_features(other, "z", np.zeros((5, 7)), encoder="other_enc")
    assert main(["predict", "--out", str(out), "--features", str(other), "--no-progress"]) == 1
    rows = {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}
    assert rows[("z", "predict")]["status"] == "failed" and "trained on 12-d" in rows[("z", "predict")]["reason"]


def test_missing_features_or_labels_skip_or_error(feature_cohort, tmp_path):
    feats, labels = feature_cohort
    with labels.open("a") as fh:
        fh.write("ghost,tumour,P99\n")
    _write_features(feats, "orphan", np.zeros((3, 12)), attrs=False)
    data = load_bagset(feats, labels, "skip")
    assert data.no_features == ["ghost"] and data.no_label == ["orphan"] and len(data.bags) == 20
    with pytest.raises(WsiMilError, match="1 labelled slide.*ghost.*1 feature file.*orphan"):
        load_bagset(feats, labels, "error")


def test_fixed_split_from_a_csv_column(feature_cohort, tmp_path):
    feats, labels = feature_cohort
    rows = list(csv.DictReader(labels.open()))
    for i, r in enumerate(rows):
        r["set"] = ["train", "train", "train", "val", "test"][i % 5]
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "o"
    assert main(["train", "--out", str(out), "--no-progress", f"train.labels={labels}", f"train.features={feats}",
                 "train.split_column=set", "train.epochs=3", "model.name=meanpool"]) == 0
    with (out / "models" / "default" / "splits.csv").open() as fh:
        got = {r["slide_id"]: r["split"] for r in csv.DictReader(fh)}
    assert got == {r["slide_id"]: r["set"] for r in rows}


def test_three_classes_train_with_macro_ovr_metrics(tmp_path):
    rng = np.random.default_rng(3)
    feats = tmp_path / "feats"
    rows = []
    for i in range(24):
        label = ["a", "b", "c"][i % 3]
        f = rng.normal(0, 1, (15, 8))
        f[:4, i % 3] += 3.0  # a few instances carry the class signal
        _write_features(feats, f"m{i:02d}", f)
        rows.append(f"m{i:02d},{label},Q{i // 3}")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--no-progress", f"train.labels={labels}", f"train.features={feats}",
                 "train.folds=3", "train.epochs=25", "train.lr=0.005", "model.hidden_dim=16",
                 "model.attention_dim=8", "model.name=abmil"]) == 0
    summary = json.loads((out / "models" / "default" / "summary.json").read_text())
    assert summary["classes"] == ["a", "b", "c"]
    assert set(summary["folds"][0]["per_class"]) == {"a", "b", "c"}
    assert summary["pooled_out_of_fold"]["auroc"] > 0.8
    with (out / "models" / "default" / "predictions.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert abs(sum(float(row[f"prob_{c}"]) for c in "abc") - 1) < 1e-4
