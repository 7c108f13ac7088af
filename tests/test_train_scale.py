"""Training that scales out: each (model, fold) fit is a task on the runner's executors, and a run built
from tasks in worker processes (or on a Dask cluster) equals the serial run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from wsi_mil.cli import main
from wsi_mil.h5io import write_h5

MODELS = "model.name=abmil,meanpool"
# fits long enough (20 epochs) that a worker killed once the first fit is back is killed mid-fit
COMMON = ["--no-progress", "encoder.name=feats", "train.folds=3", "train.epochs=20", "train.min_epochs=20",
          "model.hidden_dim=16", "model.attention_dim=8", MODELS]


@pytest.fixture(scope="module")
def cohort_bags(tmp_path_factory):
    """18 labelled 16-d bags on a patch grid, in a feature folder as extract writes it."""
    root = tmp_path_factory.mktemp("scale")
    feats = root / "features" / "feats"
    rng = np.random.default_rng(5)
    rows = ["slide_id,label,patient_id"]
    for i in range(18):
        n, label = 20 + 3 * (i % 5), i % 2
        x = rng.standard_normal((n, 16)).astype(np.float32)
        x[: 4 + i % 3, 1] += 2.5 * label
        coords = np.stack(np.divmod(np.arange(n), 5), 1)[:, ::-1].astype(np.int64) * 256
        write_h5(feats / f"s{i:02d}.h5", {"features": x, "coords": coords},
                 {"features": {"encoder_id": "feats", "feature_dim": 16}})
        rows.append(f"s{i:02d},{'tumour' if label else 'normal'},P{i}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


def _out(cohort_bags, tmp_path: Path, name: str) -> Path:
    root, _ = cohort_bags
    out = tmp_path / name
    (out / "features").mkdir(parents=True)
    os.symlink(root / "features" / "feats", out / "features" / "feats")
    return out


def _args(out: Path, labels: Path, *extra) -> list[str]:
    return ["train", "--out", str(out), f"train.labels={labels}", *COMMON, *extra]


def assert_same_runs(a: Path, b: Path) -> None:
    """The same predictions.csv and splits.csv, byte for byte, and weights within 1e-6, for every model."""
    for model in ("abmil", "meanpool"):
        ra, rb = a / "models" / f"default_{model}", b / "models" / f"default_{model}"
        for name in ("predictions.csv", "splits.csv"):
            assert (ra / name).read_bytes() == (rb / name).read_bytes(), (model, name)
        folds = sorted(p.name for p in ra.glob("fold_*.safetensors"))
        assert folds == sorted(p.name for p in rb.glob("fold_*.safetensors")) and len(folds) == 3
        for name in folds:
            wa, wb = load_file(ra / name), load_file(rb / name)
            assert wa.keys() == wb.keys()
            for key in wa:
                np.testing.assert_allclose(wa[key], wb[key], rtol=0, atol=1e-6, err_msg=f"{model} {name} {key}")


@pytest.fixture(scope="module")
def serial_run(cohort_bags, tmp_path_factory):
    out = _out(cohort_bags, tmp_path_factory.mktemp("serial"), "out")
    assert main(_args(out, cohort_bags[1])) == 0
    return out


@pytest.mark.parametrize("executor", ["process", "dask"])
def test_fits_as_tasks_on_workers_equal_the_serial_run(cohort_bags, serial_run, tmp_path, executor):
    if executor == "dask":
        pytest.importorskip("dask.distributed")
    out = _out(cohort_bags, tmp_path, executor)
    assert main(_args(out, cohort_bags[1], "--executor", executor, "--workers", "2")) == 0
    assert_same_runs(serial_run, out)
    assert not [p for p in (out / "models").iterdir() if p.name.startswith(".")]  # no temp run left


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for kid in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(kid.cmdline()):  # a pool worker, not the resource tracker
                out.append(kid)
        except psutil.Error:  # gone, or a zombie
            continue
    return out


def _kill_a_busy_worker(proc: subprocess.Popen, out: Path, timeout: float = 180) -> bool:
    """SIGKILL one pool worker once the first fit has come back (its fold is saved in the run's temp
    folder), so the workers are past their imports and fitting the next folds."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((out / "models").glob(".*/fold_*.safetensors")):
            for kid in _workers(proc):
                try:
                    kid.send_signal(signal.SIGKILL)
                    return True
                except psutil.Error:
                    continue
        time.sleep(0.02)
    return False


def _train_cmd(out: Path, labels: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "wsi_mil.cli", *_args(out, labels, "--executor", "process", "--workers", "2",
                                                        *extra)]


def test_a_worker_killed_mid_fit_is_retried_and_the_run_equals_serial(cohort_bags, serial_run, tmp_path):
    out = _out(cohort_bags, tmp_path, "killed")
    proc = subprocess.Popen(_train_cmd(out, cohort_bags[1], "runner.retries=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_a_busy_worker(proc, out)
    _, stderr = proc.communicate(timeout=600)
    assert killed, "no worker was killed mid-run"
    assert proc.returncode == 0, stderr[-2000:]
    assert_same_runs(serial_run, out)


def test_a_fit_whose_worker_keeps_dying_fails_the_train_in_one_line(cohort_bags, tmp_path):
    out = _out(cohort_bags, tmp_path, "dies")
    proc = subprocess.Popen(_train_cmd(out, cohort_bags[1], "runner.retries=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _kill_a_busy_worker(proc, out)
    _, stderr = proc.communicate(timeout=600)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[-1].startswith("error: train:") and "did not finish: worker process died" in lines[-1], lines[-1]
    assert not (out / "models" / "default_abmil").exists()  # no partial run took the name


# -- data-parallel within one fit ------------------------------------------------------------------------

# a fixed split with 10 training bags (an even share for each of 2 ranks: an odd count is padded under DDP,
# as torch's DistributedSampler pads, but not when accumulating), 4 to stop early on (patience 1, so it
# can), 4 to test; the defaults' class-weighted loss
DDP = ["model.name=abmil", "train.split_column=split", "train.epochs=6", "train.min_epochs=1", "train.patience=1",
       "model.dropout=0", "train.lr=0.005", "model.hidden_dim=16", "model.attention_dim=8", "encoder.name=feats",
       "--no-progress"]


def _split_labels(labels: Path, folder: Path) -> Path:
    rows = labels.read_text().splitlines()
    names = ["train"] * 10 + ["val"] * 4 + ["test"] * 4
    out = folder / "labels_split.csv"
    out.write_text("\n".join([rows[0] + ",split"] + [f"{r},{n}" for r, n in zip(rows[1:], names)]) + "\n")
    return out


def _weights(run: Path) -> list[dict]:
    return [load_file(run / "fold_0.safetensors")]


def test_two_gloo_ranks_with_one_bag_each_equal_one_process_accumulating_two(cohort_bags, tmp_path):
    """DDP averages the two ranks' gradients; accumulating two bags per step averages the same two."""
    labels = _split_labels(cohort_bags[1], tmp_path)
    ddp, acc, plain = (_out(cohort_bags, tmp_path, n) for n in ("ddp", "acc", "plain"))
    assert main(["train", "--out", str(ddp), f"train.labels={labels}", "--nproc", "2", *DDP]) == 0
    assert main(["train", "--out", str(acc), f"train.labels={labels}", "train.accumulate=2", *DDP]) == 0
    assert main(["train", "--out", str(plain), f"train.labels={labels}", *DDP]) == 0
    run = Path("models") / "default"
    for a, b, c in zip(_weights(ddp / run), _weights(acc / run), _weights(plain / run)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5, err_msg=key)
        # and the comparison has teeth: one bag per step moves the weights elsewhere
        assert max(float(np.abs(a[k] - c[k]).max()) for k in a) > 1e-3
    # early stopping took the same epochs, the epoch losses are the whole epoch's (summed over ranks) ...
    hist = [list(csv.DictReader((o / run / "history.csv").open())) for o in (ddp, acc)]
    assert [(r["fold"], r["epoch"]) for r in hist[0]] == [(r["fold"], r["epoch"]) for r in hist[1]]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([float(r[key]) for r in hist[0]], [float(r[key]) for r in hist[1]], rtol=1e-4)
    summaries = [json.loads((o / run / "summary.json").read_text()) for o in (ddp, acc)]
    assert [f["best_epoch"] for f in summaries[0]["folds"]] == [f["best_epoch"] for f in summaries[1]["folds"]]
    # ... and one rank wrote: one complete run, no temp folder of another process
    assert [p.name for p in (ddp / "models").iterdir()] == ["default"]


def _ddp_rank(rank: int, world: int, port: int, bags: list, dim: int, out: Path) -> None:
    """A rank that fits every registered head on the same bags under DDP (gloo) and saves its weights; with
    ``world`` 1, the reference: one process accumulating 2 bags per step (spawned too, so both sides run in
    fresh interpreters with the same torch settings)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from wsi_mil.mil.checkpoint import state_of
    from wsi_mil.mil.models import MODELS
    from wsi_mil.mil.train import fit

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    for name in sorted(MODELS):
        cfg = _head_cfg(name)
        tcfg = cfg.train if world > 1 else cfg.train.model_copy(update={"accumulate": 2})
        res = fit(bags, [], dim, 2, cfg.model, tcfg, seed=0)
        save_file(state_of(res.model), str(out / f"{name}_{rank if world > 1 else 'acc'}.safetensors"))
    if world > 1:
        dist.destroy_process_group()


def _head_cfg(name: str):
    from wsi_mil.config import load_config

    return load_config(None, [f"model.name={name}", "model.hidden_dim=16", "model.attention_dim=8",
                              "model.dropout=0", "train.epochs=2", "train.min_epochs=2", "train.balance=none",
                              "train.lr=0.01"])


def _draws_or_keeps_state(model, bag) -> bool:
    """Whether a head's training forward draws random numbers (dropout, sampling, random pseudo-bags) or it
    keeps buffers it updates: then rank 1's step cannot be the second bag of one process's step."""
    import torch

    model.train()
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(model(bag.features[None], torch.ones(1, len(bag.features), dtype=torch.bool), bag.cells[None]))
    return any(True for _ in model.buffers()) or not torch.allclose(outs[0].logits, outs[1].logits)


def test_every_head_trains_under_ddp_and_matches_accumulation_where_its_forward_draws_nothing(tmp_path):
    """Contract over the registry: under 2 gloo ranks every head trains and the ranks hold identical weights;
    where a head's forward pass is deterministic, they equal one process accumulating 2 bags per step."""
    import torch
    import torch.multiprocessing as mp

    from wsi_mil.mil.data import Bag
    from wsi_mil.mil.ddp import _free_port
    from wsi_mil.mil.models import MODELS, build_model

    g = torch.Generator().manual_seed(3)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    bags = [Bag(f"b{i}", torch.randn(16, 12, generator=g) + (i % 2), i % 2, f"p{i}", cells=grid) for i in range(8)]
    mp.spawn(_ddp_rank, args=(2, _free_port(), bags, 12, tmp_path), nprocs=2, join=True)
    mp.spawn(_ddp_rank, args=(1, 0, bags, 12, tmp_path), nprocs=1, join=True)
    matched, expected = [], []
    for name in sorted(MODELS):
        r0, r1, acc = (load_file(tmp_path / f"{name}_{r}.safetensors") for r in (0, 1, "acc"))
        model = build_model(_head_cfg(name).model, 12, 2)
        params = [k for k, _ in model.named_parameters()]
        for key in params:  # DDP keeps the ranks' parameters in step (buffers are rank 0's, broadcast)
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=f"{name} {key}")
        if all(np.allclose(r0[k], acc[k], rtol=0, atol=1e-5) for k in params):
            matched.append(name)
        if not _draws_or_keeps_state(model, bags[0]):
            expected.append(name)
    print("DDP == accumulation:", matched, "expected:", expected)
    assert set(expected) <= set(matched)
    assert "abmil" in expected and len(expected) >= len(MODELS) // 2  # the detector is not vacuous
