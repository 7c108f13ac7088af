"""fits: ``wsi-mil train`` with three heads x 5 folds (one x 2 with ``--quick``), serial in one process vs each (model, fold) fit a
task on a 2-worker Dask LocalCluster; wall times and their ratio in one run, and whether the runs agree."""

from __future__ import annotations

import contextlib
import io
import time

from .options import Options
from .scale import _synthetic_cohort


def _train(out, feats, labels, models: str, extra: list[str]) -> float:
    from wsi_mil.cli import main

    args = ["train", "--out", str(out), "--no-progress", f"train.features={feats}", f"train.labels={labels}",
            f"model.name={models}", "train.seed=0", *extra]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    if code != 0:
        raise RuntimeError(f"train exited {code}: {' '.join(args)}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def _cluster():
    import logging

    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster:  # no shutdown-race tracebacks
        yield cluster.scheduler_address


def run(opts: Options) -> None:
    """Two bag sizes: WSI-like bags (one fit keeps both cores busy through torch's threads) and
    classical-MIL-sized ones (a fit is mostly Python and dispatch, one core each)."""
    if opts.quick:
        _compare(opts, (10, 50, 64, 2), "abmil", 2)
        return
    models = "abmil,abmil_gated,meanpool"
    _compare(opts, (40, 200, 256, 20), models, 5)
    _compare(opts, (60, 30, 166, 40), models, 5)


def _compare(opts: Options, shape: tuple[int, int, int, int], models: str, folds: int) -> None:
    import shutil

    n_bags, n_inst, dim, epochs = shape
    n_models = len(models.split(","))
    folder = opts.cache / f"fits_{n_bags}x{n_inst}x{dim}"
    labels = _synthetic_cohort(folder, n_bags, n_inst, dim)
    extra = [f"train.epochs={epochs}", f"train.min_epochs={epochs}", f"train.folds={folds}"]
    print(f"\n== fits: wsi-mil train, {n_models} heads x {folds} folds = {n_models * folds} fits, {n_bags} bags x {n_inst} x {dim}, {epochs} epochs; "
          "serial vs --executor dask --workers 2 (LocalCluster)")
    outs = {name: opts.cache / f"fits_out_{name}" for name in ("serial", "dask", "joined")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    serial = _train(outs["serial"], folder / "feats", labels, models, extra)
    dask = _train(outs["dask"], folder / "feats", labels, models, [*extra, "runner.executor=dask", "runner.workers=2"])
    with _cluster() as address:  # a running cluster, as on SLURM: train joins it, no start-up in the time
        joined = _train(outs["joined"], folder / "feats", labels, models, [*extra, f"runner.dask_address={address}",
                                                                            "runner.executor=dask"])
    runs = ["default"] if n_models == 1 else [f"default_{m}" for m in models.split(",")]  # train's run names
    same = all((outs["serial"] / "models" / r / "predictions.csv").read_bytes()
               == (outs[name] / "models" / r / "predictions.csv").read_bytes() for r in runs for name in ("dask", "joined"))
    print(f"  serial {serial:.1f} s, dask 2 workers {dask:.1f} s (cluster start included): "
          f"serial/dask = {serial / dask:.2f}; joining a running 2-worker cluster {joined:.1f} s: "
          f"serial/joined = {serial / joined:.2f}; predictions.csv identical: {same}")
