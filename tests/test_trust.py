"""Issue 17: defects that betray a user's trust (wrong results, silent label classes, swapped folds, formula
injection, tracebacks where one line is promised). Each test reproduces one defect with real files and the
real CLI; each failed on the code before the fix."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_mil.atomic import neutralise, restore, write_csv
from wsi_mil.cli import main, parse_args
from wsi_mil.h5io import write_h5
from wsi_mil.layout import Layout
from wsi_mil.runner import read_manifest
from wsi_mil.userfiles import read_csv_rows

SMALL = ["model.hidden_dim=16", "model.attention_dim=8", "train.epochs=2", "train.min_epochs=1"]


def write_bag(folder: Path, slide_id: str, x: np.ndarray) -> Path:
    path = folder / f"{slide_id}.h5"
    write_h5(path, {"features": x.astype(np.float32), "coords": np.zeros((len(x), 2), np.int64)},
             {"features": {"encoder_id": "feats", "feature_dim": x.shape[1]}})
    return path


def make_bags(root: Path, labels: list[str], ids: list[str] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """``root/out`` with one 12-d bag per label under features/feats, and a labels CSV."""
    feats = root / "out" / "features" / "feats"
    rng = np.random.default_rng(seed)
    ids = ids or [f"b{i:02d}" for i in range(len(labels))]
    rows = []
    for i, (sid, label) in enumerate(zip(ids, labels)):
        x = rng.standard_normal((20, 12))
        x[:4, 0] += 3.0 * (i % 2)
        write_bag(feats, sid, x)
        rows.append({"slide_id": sid, "label": label, "patient_id": f"P{i}"})
    path = root / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["slide_id", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "out", path


def train(out: Path, labels: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), "--no-progress", "encoder.name=feats", f"train.labels={labels}", *SMALL, *extra])


def one_line_error(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 bags, a 3-fold run."""
    out, labels = make_bags(tmp_path_factory.mktemp("trained"), ["normal", "tumour"] * 10)
    assert train(out, labels, "train.folds=3") == 0
    return out, labels


# -- 1.4 non-finite features are an error, never a prediction ------------------------------------------

def test_predict_fails_a_slide_with_nan_or_inf_features_naming_the_file(trained, tmp_path, capsys):
    out, _ = trained
    feats = tmp_path / "feats"
    good = np.random.default_rng(1).standard_normal((10, 12))
    write_bag(feats, "fine", good)
    for sid, bad in (("s_nan", np.nan), ("s_inf", np.inf)):
        x = good.copy()
        x[3, 5] = bad
        write_bag(feats, sid, x)
    result = tmp_path / "pred.csv"
    code = main(["predict", "--out", str(out), "--features", str(feats), "--output", str(result)])
    assert code == 1
    rows = {r["slide_id"]: r for r in read_csv_rows(result, "predictions")}
    assert set(rows) == {"fine"} and np.isfinite(float(rows["fine"]["prob_tumour"]))
    manifest = {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}
    for sid in ("s_nan", "s_inf"):
        assert manifest[(sid, "predict")]["status"] == "failed"
        assert f"{sid}.h5" in manifest[(sid, "predict")]["reason"] and "NaN or inf" in manifest[(sid, "predict")]["reason"]


def test_train_refuses_a_nan_bag_before_any_fold_trains(tmp_path, capsys):
    out, labels = make_bags(tmp_path, ["normal", "tumour"] * 4)
    x = np.ones((20, 12))
    x[0, 0] = np.nan
    write_bag(out / "features" / "feats", "b05", x)
    one_line_error(capsys, train(out, labels, "train.folds=2"), "b05.h5")
    assert not (out / "models" / "default").exists()
    assert not [p for p in (out / "models").iterdir()] if (out / "models").exists() else True


# -- 1.5 label variants never become classes silently ----------------------------------------------------

def test_labels_are_stripped_and_case_variants_are_an_error_unless_folded(tmp_path, capsys):
    variants = ["tumour", " tumour", "Tumour", "tumour ", "TUMOUR", "normal", "normal", "normal ", "tumour", "normal"]
    out, labels = make_bags(tmp_path, variants)
    msg = one_line_error(capsys, train(out, labels, "train.folds=2"), "differ only in case")
    assert "'Tumour'" in msg and "'TUMOUR'" in msg and "fold_label_case" in msg
    assert train(out, labels, "train.folds=2", "train.fold_label_case=true") == 0
    summary = json.loads((out / "models" / "default" / "summary.json").read_text())
    assert summary["classes"] == ["normal", "tumour"]  # the spelling most rows use, spaces stripped


def test_an_empty_label_or_a_short_row_is_one_line_naming_the_row(tmp_path, capsys):
    out, labels = make_bags(tmp_path, ["normal", "tumour"] * 3)
    text = labels.read_text().splitlines()
    labels.write_text("\n".join([*text[:3], "b02,,P2", *text[4:]]) + "\n")
    one_line_error(capsys, train(out, labels), "line 4: empty label")
    labels.write_text("\n".join([*text[:3], "b02", *text[4:]]) + "\n")
    one_line_error(capsys, train(out, labels), "line 4: empty label")


# -- 1.6 a swapped fold file is refused ------------------------------------------------------------------

def test_a_fold_file_copied_over_another_is_refused_by_predict_and_compare(trained, tmp_path, capsys):
    out, _ = trained
    run = tmp_path / "copied"
    shutil.copytree(out / "models" / "default", run)
    shutil.copyfile(run / "fold_0.safetensors", run / "fold_1.safetensors")
    one_line_error(capsys, main(["predict", "--out", str(out), "--model", str(run)]), "fold_1.safetensors")
    one_line_error(capsys, main(["compare", str(run)]), "fold_sha256")


# -- 1.8 formula injection -------------------------------------------------------------------------------

DANGEROUS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "'quoted", "'=both"]


def test_the_csv_writer_neutralises_formulas_and_our_readers_give_the_text_back(tmp_path):
    for value in [*DANGEROUS, "plain", "-0.5", "+3e-2", "", "'"]:
        assert restore(neutralise(value)) == value
    for value in DANGEROUS:
        assert neutralise(value).startswith("'")
    assert neutralise("-0.5") == "-0.5" and neutralise(-0.5) == -0.5  # numbers stay numbers
    path = tmp_path / "x.csv"
    write_csv(path, [{"slide_id": v, "n": 1} for v in DANGEROUS])
    with path.open(newline="") as fh:
        raw = [r["slide_id"] for r in csv.DictReader(fh)]
    assert all(cell[0] == "'" for cell in raw)  # what a spreadsheet sees: text, not a formula
    assert [r["slide_id"] for r in read_csv_rows(path, "x")] == DANGEROUS


def test_ids_labels_and_reasons_in_every_csv_we_write_are_neutralised(tmp_path):
    ids = ["=cmd", "+plus", "-minus", "@at", "ok1", "ok2", "ok3", "ok4"]
    out, labels = make_bags(tmp_path, ["=evil", "normal"] * 4, ids=ids)
    assert train(out, labels, "train.folds=2") == 0
    write_bag(out / "features" / "feats", "=bad", np.full((3, 12), np.nan))  # a failed slide: reason in the manifest
    assert main(["predict", "--out", str(out)]) == 1
    assert main(["compare", str(out / "models" / "default")]) == 0
    run = out / "models" / "default"
    files = [run / "splits.csv", run / "predictions.csv", out / "predictions" / "default.csv", out / "manifest.csv",
             out / "models" / "comparison.csv"]
    for path in files:
        with path.open(newline="") as fh:
            cells = [c for row in csv.reader(fh) for c in row]
        risky = [c for c in cells if c and c[0] in "=+-@\t\r" and not _number(c)]
        assert not risky, (path.name, risky)
    assert {r["slide_id"] for r in read_csv_rows(run / "splits.csv", "splits")} == set(ids)
    assert "=evil" in {r["label"] for r in read_csv_rows(run / "predictions.csv", "p")}
    assert ("=bad", "predict") in {(r["slide_id"], r["stage"]) for r in read_manifest(out / "manifest.csv")}


def _number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


# -- 2: small cohorts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, folds", [(8, 2), (10, 5), (6, 9)])
def test_small_cohorts_train_with_fewer_splits_instead_of_crashing(tmp_path, n, folds):
    out, labels = make_bags(tmp_path, ["normal", "tumour"] * (n // 2))
    assert train(out, labels, f"train.folds={folds}") == 0
    summary = json.loads((out / "models" / "default" / "summary.json").read_text())
    assert 2 <= summary["n_folds"] <= folds and summary["pooled_out_of_fold"]["n"] == n


def test_a_class_with_one_slide_is_one_line_saying_what_would_work(tmp_path, capsys):
    out, labels = make_bags(tmp_path, ["normal", "normal", "normal", "tumour"])
    one_line_error(capsys, train(out, labels, "train.folds=2"), "train.folds=1")
    assert train(out, labels, "train.folds=1", "train.val_fraction=0") == 0


# -- 2: empty bags, stray files, compare, CLI ---------------------------------------------------------------

def test_an_empty_bag_gets_no_prediction_and_does_not_count_in_the_metrics(tmp_path):
    out, labels = make_bags(tmp_path, ["normal", "tumour"] * 5)
    write_bag(out / "features" / "feats", "b09", np.zeros((0, 12)))
    assert train(out, labels, "train.folds=2") == 0
    run = out / "models" / "default"
    rows = {r["slide_id"]: r for r in read_csv_rows(run / "predictions.csv", "p")}
    assert rows["b09"]["pred"] == "" and rows["b09"]["prob_tumour"] == "" and "0 patches" in rows["b09"]["note"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pooled_out_of_fold"]["n"] == 9 and summary["skipped"]["no_patches"] == ["b09"]
    assert "b09" not in {r["slide_id"] for r in read_csv_rows(run / "splits.csv", "s")}


def test_hidden_and_temp_files_in_a_features_folder_are_not_slides(trained, tmp_path):
    out, _ = trained
    feats = tmp_path / "feats"
    write_bag(feats, "real", np.random.default_rng(2).standard_normal((6, 12)))
    write_bag(feats, ".hidden", np.ones((6, 12)))
    write_bag(feats, ".real.wsi_mil-tmp-otherhost-99", np.ones((6, 12)))
    result = tmp_path / "p.csv"
    assert main(["predict", "--out", str(out), "--features", str(feats), "--output", str(result)]) == 0
    assert [r["slide_id"] for r in read_csv_rows(result, "p")] == ["real"]


def test_compare_gives_no_p_value_without_splits_and_names_missing_runs_and_folds(trained, tmp_path, capsys):
    out, _ = trained
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out / "models" / "default", a)
    shutil.copytree(out / "models" / "default", b)
    summary = json.loads((b / "summary.json").read_text())
    for fold in summary["folds"]:
        fold["auroc"] = max(0.0, fold["auroc"] - 0.1 * (fold["fold"] + 1))
    (b / "summary.json").write_text(json.dumps(summary))
    for run in (a, b):
        (run / "splits.csv").unlink()
    assert main(["compare", str(a), str(b), "--output", str(tmp_path)]) == 0
    rows = read_csv_rows(tmp_path / "comparison.csv", "c")
    assert all(r["p_vs_best"] == "nan" for r in rows)
    one_line_error(capsys, main(["compare", str(a), str(tmp_path / "nope")]), "nope")
    (b / "fold_2.safetensors").unlink()
    one_line_error(capsys, main(["compare", str(a), str(b)]), "fold_2.safetensors")
    (a / "summary.json").write_text((a / "summary.json").read_text()[:40])
    one_line_error(capsys, main(["compare", str(a)]), "summary.json")


def test_a_checkpoint_whose_metadata_does_not_match_its_weights_is_one_line(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out, _ = trained
    src = out / "models" / "default" / "fold_0.safetensors"
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fh:
        meta = json.loads(fh.metadata()["wsi_mil"])
    meta["model"]["hidden_dim"] = 32
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(src)), str(bad), metadata={"wsi_mil": json.dumps(meta)})
    one_line_error(capsys, main(["predict", "--out", str(out), "--model", str(bad)]), "do not match its metadata")


def test_a_full_disk_while_train_writes_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    out, labels = make_bags(tmp_path, ["normal", "tumour"] * 3)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("wsi_mil.mil.checkpoint.save_file", full)
    one_line_error(capsys, train(out, labels, "train.folds=1"), "StorageFull")
    assert not Layout(out).run_dir("default").exists()


def test_overrides_are_accepted_before_and_after_options():
    args = parse_args(["train", "--out", "o", "a.b=1", "--no-progress", "c.d=2", "--overwrite", "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.no_progress and args.overwrite
    with pytest.raises(SystemExit):
        parse_args(["train", "--out", "o", "a=1", "--bogus"])


def test_every_help_page_renders(capsys):
    """`wsi-mil --help` and each subcommand's --help print and exit 0 (argparse %-formats help texts)."""
    from wsi_mil.cli import HELP

    for argv in (["--help"], *([stage, "--help"] for stage in HELP)):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith("usage: wsi-mil"), argv
        assert all(stage in text for stage in HELP) if argv == ["--help"] else HELP[argv[0]] in " ".join(text.split())


def test_a_refused_command_leaves_no_new_out_folder(tmp_path, capsys):
    """A typo in --slides or a missing key leaves the file system as it was: the --out folders the command
    made are removed again while empty; a folder that existed, or holds anything, stays."""
    deep = tmp_path / "new" / "study"
    one_line_error(capsys, main(["tile", "--slides", str(tmp_path / "typo"), "--out", str(deep)]), "typo")
    assert not (tmp_path / "new").exists()
    one_line_error(capsys, main(["train", "--out", str(deep), "--no-progress"]), "train.labels")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    one_line_error(capsys, main(["train", "--out", str(kept), "--no-progress"]), "train.labels")
    assert kept.is_dir()


# -- the real stages: run's ignored labels, heatmap's non-finite features ---------------------------------

REAL_ENC = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0"]


@pytest.fixture
def mapped_copy(mapped, tmp_path):
    slides, out0 = mapped
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nm0,normal\nm1,tumour\n")
    assert main(["train", "--out", str(out), "--no-progress", *REAL_ENC, f"train.labels={labels}", "train.folds=1",
                 "train.val_fraction=0", "train.epochs=1", "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    return slides, out


def test_run_says_when_its_labels_are_not_used_because_a_complete_model_exists(mapped_copy, tmp_path, capsys):
    slides, out = mapped_copy
    other = tmp_path / "other.csv"
    other.write_text("slide_id,label\nm0,A\nm1,B\nglass,C\n")
    code = main(["run", "--slides", str(slides), "--out", str(out), "--no-progress", *REAL_ENC,
                 f"train.labels={other}", "heatmap.exports=[png]", "heatmap.top_k=0"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    note = [line for line in stdout.splitlines() if "train.labels is not trained on" in line]
    assert len(note) == 1 and "['normal', 'tumour']" in note[0] and "['A', 'B', 'C']" in note[0], stdout


def test_heatmap_fails_a_slide_with_non_finite_features_naming_the_file(mapped_copy):
    slides, out = mapped_copy
    path = Layout(out).features("resnet18", "m1")
    with h5py.File(path, "r+") as fh:
        fh["features"][0, 0] = np.nan
    assert main(["heatmap", "--slides", str(slides), "--out", str(out), "--no-progress", *REAL_ENC,
                 "heatmap.exports=[png]", "heatmap.top_k=0"]) == 1
    row = {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}[("m1", "heatmap")]
    assert row["status"] == "failed" and "m1.h5" in row["reason"] and "NaN or inf" in row["reason"]
    assert not Layout(out).heatmap_dir("default", "m1").exists()
    assert Layout(out).heatmap_summary("default", "m0").is_file()
