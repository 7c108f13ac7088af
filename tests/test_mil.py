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
from wsi_mil.mil.models import MODELS, build_model, create_model, head_options
from wsi_mil.mil.splits import kfold_splits
from wsi_mil.mil.train import fit, predict_bags
from wsi_mil.runner import read_manifest


def _grid_bags() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two bags of 16-d instances on a patch grid (cells touching, so spatial heads see neighbours); the
    second is padded after 4 instances."""
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    cells = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [3, 2], [2, 1]])
    return x, mask, torch.stack([cells, cells.flip(0)])


def _loss_with(model, x, mask, cells) -> float:
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        loss = float(model.compute_loss(model(x, mask, cells), torch.tensor([0, 2]))["loss"])
    model.eval()
    return loss


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_follows_the_contract(name):
    """Every registered head: output shapes, padding invariance (features and cells), a bag alone equals
    it padded, the same seed gives the same model, the loss backpropagates into its parameters, and heads
    that use positions give the same output for a translated grid and a different one for a shuffled grid."""
    torch.manual_seed(0)
    small = {"name": name, "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0}  # each head takes what it declares
    model = build_model(small, 16, 3).eval()
    x, mask, cells = _grid_bags()
    out = model(x, mask, cells)
    scores = out.instance_scores
    assert out.logits.shape == (2, 3)
    assert scores.shape == ((2, 3, 7) if model.per_class else (2, 7))
    pad = scores[1, ..., 4:]
    assert torch.isneginf(pad).all() and torch.isfinite(scores[0]).all() and torch.isfinite(scores[1, ..., :4]).all()
    x2, cells2 = x.clone(), cells.clone()
    x2[1, 4:] = 1e3  # garbage in padded slots changes nothing
    cells2[1, 4:] = torch.tensor([0, 0])
    out2 = model(x2, mask, cells2)
    torch.testing.assert_close(out.logits, out2.logits)
    torch.testing.assert_close(out.instance_scores, out2.instance_scores)
    alone = model(x[1:, :4], mask[1:, :4], cells[1:, :4])  # the same bag alone, unpadded
    torch.testing.assert_close(out.logits[1:], alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[1, ..., :4], alone.instance_scores[0], atol=1e-5, rtol=1e-5)
    moved = model(x, mask, cells + torch.tensor([1000, -37]))  # the same tissue further along the slide
    torch.testing.assert_close(moved.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.instance_scores, out.instance_scores, atol=1e-5, rtol=1e-5)
    apart = model(x, mask, cells * 5)  # no two patches touch: a head that uses positions sees it (in its
    assert MODELS[name].uses_positions == (_loss_with(model, x, mask, cells * 5) != _loss_with(model, x, mask, cells)
                                           or not torch.allclose(apart.logits, out.logits, atol=1e-5))  # output or loss)
    torch.manual_seed(0)
    twin = build_model(small, 16, 3).eval()
    torch.testing.assert_close(twin(x, mask, cells).logits, out.logits)
    model.train()
    losses = model.compute_loss(model(x, mask, cells), torch.tensor([0, 2]))
    assert "loss" in losses and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # a class absent from y may get none
    assert len(grads) >= len(list(model.parameters())) // 2 and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_head_declares_typed_options_that_refuse_unknown_keys_and_bad_values(name):
    from wsi_mil.errors import ConfigError

    options = MODELS[name].options
    assert head_options(name, {}) == options()  # every option has a default
    fields = options.model_fields
    assert {"hidden_dim", "dropout"} <= set(fields)
    with pytest.raises(ConfigError, match=f"model '{name}' takes no option 'no_such_option'"):
        create_model(name, 6, 2, no_such_option=1)
    for key, bad in (("dropout", 1.5), ("hidden_dim", 0), ("attention_dim", -1)):
        if key in fields:
            with pytest.raises(ConfigError, match=f"option '{key}'"):
                create_model(name, 6, 2, **{key: bad})
    # the config's shared keys reach a head only if it declares them: no head has to accept all three
    cfg = {"name": name, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0, "kwargs": {}}
    assert sum(p.numel() for p in build_model(cfg, 6, 2).parameters()) > 0


def test_a_bad_head_option_on_the_command_line_is_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "train.labels=nowhere.csv", "model.name=clam_sb",
                 "model.kwargs.instance_loss=hinge"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "option 'instance_loss'" in err[0] and err[0].startswith("error: ")


def test_models_are_built_from_names_and_kwargs_and_refuse_unknown_options():
    from wsi_mil.errors import ConfigError
    from wsi_mil.mil.models import build_model

    m = build_model({"name": "clam_sb", "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0,
                     "kwargs": {"k_sample": 3, "instance_loss": "svm"}}, 6, 2)
    assert m.k_sample == 3 and m.instance_loss == "svm"
    with pytest.raises(ConfigError, match="takes no option 'k_samples'"):
        create_model("clam_sb", 6, 2, k_samples=3)
    with pytest.raises(ConfigError, match="unknown MIL model 'abmill'"):
        create_model("abmill", 6, 2)


def test_gated_attention_is_tanh_times_sigmoid():
    torch.manual_seed(0)
    m = create_model("abmil_gated", 6, 2, hidden_dim=5, attention_dim=3, dropout=0.0).eval()
    x = torch.randn(1, 4, 6)
    att = m(x, torch.ones(1, 4, dtype=torch.bool)).instance_scores
    h, a = m.embed(x), m.attention
    expected = a.w(torch.tanh(a.V(h)) * torch.sigmoid(a.U(h))).squeeze(-1)
    torch.testing.assert_close(att, expected)
    assert create_model("abmil", 6, 2).attention.U is None


def test_transmil_attention_is_softmax_attention_and_nystrom_agrees_where_it_is_exact():
    """Short sequences take softmax attention (checked against torch's own); longer ones the Nyström formula,
    which is exact (up to the iterative pseudo-inverse) when every landmark group holds copies of one token."""
    from wsi_mil.mil.models.transmil import NystromAttention

    torch.manual_seed(0)
    att = NystromAttention(32, heads=4, landmarks=8, dropout=0.0).eval()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        out, row = att(x, row=0)
        q, k, v = (t.reshape(1, 8, 4, 8).transpose(1, 2) for t in att.to_qkv(x).chunk(3, dim=-1))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v) + att.res_conv(v)
        torch.testing.assert_close(out, att.to_out(ref.transpose(1, 2).reshape(1, 8, 32)))
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        torch.testing.assert_close(row, weights[:, :, 0].mean(1))

        repeated = x.repeat_interleave(5, dim=1)  # 40 tokens > 8 landmarks: the Nyström path
        nystrom, nrow = att(repeated, row=0)
        exact, erow = att._exact(repeated, 0)
    assert (nystrom - exact).abs().max() < 0.03 * exact.abs().max()
    assert (nrow - erow).abs().max() < 0.03 * erow.max()


def test_transmil_ppeg_is_its_three_convolutions_plus_identity_with_the_same_gradients():
    """PPEG (Shao et al. 2021, eq. 7 and Algorithm 2): grid + conv7(grid) + conv5(grid) + conv3(grid), each
    a zero-padded depthwise convolution. Ours runs them as one summed 7x7 kernel; the reference here runs
    the three nn.Conv2d layers themselves, and every kernel's and bias's gradient must agree too."""
    from wsi_mil.mil.models.transmil import PPEG

    torch.manual_seed(0)
    ppeg, side = PPEG(16), 5
    x = torch.randn(2, 1 + side * side, 16, requires_grad=True)
    target = torch.randn(2, 1 + side * side, 16)
    got = ppeg(x, side)
    (got * target).sum().backward()
    ours = [p.grad.clone() for p in ppeg.parameters()] + [x.grad.clone()]
    ppeg.zero_grad()
    x.grad = None
    grid = x[:, 1:].transpose(1, 2).reshape(2, 16, side, side)
    ref_grid = grid + ppeg.convs[0](grid) + ppeg.convs[1](grid) + ppeg.convs[2](grid)
    ref = torch.cat([x[:, :1], ref_grid.flatten(2).transpose(1, 2)], dim=1)
    (ref * target).sum().backward()
    torch.testing.assert_close(got, ref)
    for a, b in zip(ours, [p.grad for p in ppeg.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b)
    assert [k for k, _ in ppeg.state_dict().items()] == [f"convs.{i}.{w}" for i in range(3) for w in ("weight", "bias")]


def test_smooth_top1_svm_matches_its_definition():
    from wsi_mil.mil.models.clam import smooth_top1_svm

    s = torch.tensor([[2.0, 0.5], [0.1, 0.3]])
    y = torch.tensor([0, 0])
    expected = [np.log(np.exp(0.0) + np.exp(1 + 0.5 - 2.0)), np.log(np.exp(0.0) + np.exp(1 + 0.3 - 0.1))]
    assert smooth_top1_svm(s, y).item() == pytest.approx(np.mean(expected), rel=1e-6)


DIGITS = None


def _digits():
    global DIGITS
    if DIGITS is None:
        DIGITS = digits_bags(n_train=200, n_test=80, seed=0)
    return DIGITS


@pytest.mark.parametrize("name", sorted(n for n in MODELS if create_model(n, 4, 2).localises))
def test_digits_bags_bag_and_instance_auroc(name):
    """The MNIST-bags experiment of Ilse et al. on sklearn's digits (small version; full one in make bench).
    Every head that claims to localise is held to the same bar."""
    train, test, inst = _digits()
    cfg = load_config(None, [f"model.name={name}", "model.hidden_dim=64", "model.attention_dim=32",
                             "model.dropout=0.0", "train.epochs=30", "train.lr=0.002", "train.batch_size=8"])
    res = fit(train[40:], train[:40], 64, 2, cfg.model, cfg.train, seed=0)
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


def test_a_test_fold_of_one_class_is_null_in_the_run_summary_and_compare_still_reads_it(feature_cohort, tmp_path,
                                                                                         capsys):
    """A fixed split whose test slides are all normal leaves that fold's AUROC undefined. summary.json says
    so with null: NaN is not JSON, and strict readers (jq, a browser's JSON.parse) refuse a file holding it."""
    feats, labels = feature_cohort
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # patients P0 and P2 (normal) are the test set; P4 (normal) and P5 (tumour) validate
        pid = int(r["patient_id"][1:])
        r["split"] = "test" if pid in (0, 2) else "val" if pid in (4, 5) else "train"
    split_labels = tmp_path / "split.csv"
    with split_labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--no-progress", f"train.labels={split_labels}",
                 f"train.features={feats}", "train.split_column=split", "train.epochs=2", "model.hidden_dim=8",
                 "model.attention_dim=4"]) == 0
    assert "AUROC undefined in every one of the 1 test folds" in capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"summary.json holds {name}")

    run = out / "models" / "default"
    summary = json.loads((run / "summary.json").read_text(), parse_constant=refuse)
    fold = summary["folds"][0]
    assert fold["auroc"] is None and summary["mean_std"]["auroc"]["mean"] is None
    assert fold["accuracy"] == pytest.approx(fold["balanced_accuracy"])  # defined: recall of the one class
    assert main(["compare", str(run), "--output", str(tmp_path / "cmp")]) == 0
    with (tmp_path / "cmp" / "comparison.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["auroc_mean"] == "nan"
    assert float(row["balanced_accuracy_mean"]) == pytest.approx(fold["balanced_accuracy"])


def test_several_models_train_on_identical_splits_and_compare_writes_the_table(feature_cohort, tmp_path):
    feats, labels = feature_cohort
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--no-progress", f"train.features={feats}", f"train.labels={labels}",
                 "model.name=abmil,clam_sb,dsmil", "train.folds=3", "train.epochs=3", "model.hidden_dim=16",
                 "model.attention_dim=8"]) == 0
    runs = [out / "models" / f"default_{m}" for m in ("abmil", "clam_sb", "dsmil")]
    splits = {(r / "splits.csv").read_text() for r in runs}
    assert len(splits) == 1  # identical folds
    for r in runs:
        assert json.loads((r / "summary.json").read_text())["model"] == r.name.removeprefix("default_")
    assert main(["compare", *map(str, runs)]) == 0
    with (out / "models" / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["model"] for r in rows) == ["abmil", "clam_sb", "dsmil"]
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and float(best[0]["auroc_mean"]) == max(float(r["auroc_mean"]) for r in rows)
    assert all(0 <= float(r["p_vs_best"]) <= 1 for r in rows)
    md = (out / "models" / "comparison.md").read_text()
    assert md.count("\n") == 5 and "± " in md and (out / "models" / "comparison.png").stat().st_size > 0
    # pooled out of fold: the AUROC of each run's predictions.csv, its bootstrap interval, DeLong vs the best
    from sklearn.metrics import roc_auc_score
    from test_intervals import _delong_by_loops

    def oof(run):
        with (run / "predictions.csv").open() as fh:
            got = [r for r in csv.DictReader(fh) if r["prob_tumour"]]
        return np.array([r["label"] == "tumour" for r in got]), np.array([float(r["prob_tumour"]) for r in got])

    best_run = out / "models" / best[0]["run"]
    y, best_s = oof(best_run)
    for r in rows:
        ry, s_ = oof(out / "models" / r["run"])
        assert float(r["pooled"]) == pytest.approx(roc_auc_score(ry, s_), abs=1e-9)
        assert float(r["pooled_low"]) <= float(r["pooled"]) <= float(r["pooled_high"])
        if r["best"] != "True":
            assert float(r["p_pooled_vs_best"]) == pytest.approx(_delong_by_loops(y, s_, best_s)[3], rel=1e-6)
    assert "pooled AUROC [95% CI]" in md


def test_streaming_bags_through_a_small_cache_trains_the_same_model_in_bounded_memory(feature_cohort, monkeypatch):
    import wsi_mil.mil.data as bag_data
    from wsi_mil.mil.data import BagCache

    feats, labels = feature_cohort
    data = load_bagset(feats, labels)
    assert all(b.features is None for b in data.bags)  # nothing is read up front
    cfg = load_config(None, ["model.hidden_dim=16", "model.attention_dim=8", "train.epochs=3", "train.min_epochs=3",
                             "train.max_instances=15"])
    bag_bytes = [b.n_instances * 12 * 4 for b in data.bags]
    small = BagCache(max(bag_bytes) * 3)  # three bags of twenty
    roomy = BagCache(1e9)
    held, mapped = [], bag_data.mapped_empty  # what the small cache holds as each new bag is mapped, with it
    monkeypatch.setattr(bag_data, "mapped_empty", lambda shape, dt: held.append(
        small.bytes + int(np.prod(shape)) * np.dtype(dt).itemsize) or mapped(shape, dt))
    fits = [fit(data.bags[:16], data.bags[16:], 12, 2, cfg.model, cfg.train, seed=3, cache=small)]
    monkeypatch.undo()
    fits.append(fit(data.bags[:16], data.bags[16:], 12, 2, cfg.model, cfg.train, seed=3, cache=roomy))
    assert small.bytes <= small.max_bytes and small.reads > 2 * len(data.bags)  # evicted and re-read
    assert len(held) == small.reads and max(held) <= small.max_bytes  # room made before a bag is read
    assert roomy.reads == len(data.bags)  # every bag read once, then served from memory
    test = data.bags[16:]
    np.testing.assert_array_equal(predict_bags(fits[0].model, test)[0], predict_bags(fits[1].model, test)[0])
    half = BagCache(1e9, torch.float16)
    assert half.get(data.bags[0]).dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_training_give_the_same_metrics_within_tolerance():
    train, test, inst = digits_bags(n_train=120, n_test=60, seed=2)
    cfg = load_config(None, ["model.hidden_dim=64", "model.attention_dim=32", "model.dropout=0.0", "train.epochs=15",
                             "train.lr=0.002", "train.min_epochs=15"])
    results = {}
    for device in ("cpu", "cuda"):
        res = fit(train, [], 64, 2, cfg.model, cfg.train, seed=0, device=device)
        results[device] = evaluate(res.model.cpu().float(), test, inst)
    assert abs(results["cpu"][0] - results["cuda"][0]) <= 0.05
    assert abs(results["cpu"][1] - results["cuda"][1]) <= 0.05


def test_wsi_mil_models_lists_every_head_and_the_readme_carries_the_same_table(capsys):
    """One row per registered head, its flags read off the built head; the README's table is the same."""
    from pathlib import Path

    from wsi_mil.mil.models.table import markdown_table

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == sorted(MODELS)
    for name in MODELS:
        built = create_model(name, 8, 2)
        row = next(ln for ln in lines if ln.split()[0] == name)
        assert row.count("yes") == int(built.localises) + int(built.per_class) + int(MODELS[name].uses_positions)
        assert MODELS[name].paper in row
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "\n".join("  " + ln for ln in markdown_table().splitlines()) in readme
