"""mil: k-fold CV bag accuracy of every head on the classical MIL data sets (../shared/mil_benchmarks)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .options import Options

MIL_DATA = ["ucsb_breast_cancer", "protein", "corel_dogs", "birds_brown_creeper"]


def _mil_job(job: tuple) -> tuple:
    """One (data set, model, repeat, fold): standardise on the training bags, train with the ilse2018 recipe.

    Repeat r shuffles the stratified folds with seed r, so every model sees the same splits in a repeat."""
    import torch

    torch.set_num_threads(1)
    from sklearn.model_selection import StratifiedKFold

    from wsi_mil.config import load_config
    from wsi_mil.mil.data import Bag
    from wsi_mil.mil.train import fit, predict_bags

    path, name, repeat, fold, folds, overrides, recipe = job
    bags_x, y = _mil_bags(path)
    splits = StratifiedKFold(folds, shuffle=True, random_state=repeat).split(np.zeros(len(y)), y)
    train_idx, test_idx = list(splits)[fold]
    stack = np.concatenate([bags_x[i] for i in train_idx])
    mean, std = stack.mean(0), stack.std(0) + 1e-6

    def bag(i):
        return Bag(str(i), torch.from_numpy(((bags_x[i] - mean) / std).astype(np.float32)), int(y[i]), str(i))

    recipe_file = Path(__file__).resolve().parents[2] / "configs" / "mil" / "ilse2018.yaml"
    cfg = load_config(recipe_file if recipe == "ilse2018" else None, [f"model.name={name}", *overrides])
    val_idx = []
    if cfg.train.val_fraction > 0:  # the packaged defaults: early stopping on a stratified share of the fold
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(train_idx, test_size=cfg.train.val_fraction, stratify=y[train_idx],
                                              random_state=repeat * folds + fold)
    t0 = time.perf_counter()
    res = fit([bag(i) for i in train_idx], [bag(i) for i in val_idx], stack.shape[1], 2, cfg.model, cfg.train,
              seed=repeat * folds + fold)
    probs, _ = predict_bags(res.model, [bag(i) for i in test_idx])
    correct = int((probs.argmax(1) == y[test_idx]).sum())
    return Path(path).name.split(".")[0], name, repeat, correct, len(test_idx), time.perf_counter() - t0


_MIL_CACHE: dict = {}


def _mil_bags(path: str):
    if path not in _MIL_CACHE:  # column 0: bag label, column 1: bag id, then the instance's features
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        ids, first = np.unique(table[:, 1], return_index=True)
        bags = [table[table[:, 1] == i, 2:].astype(np.float32) for i in ids]
        _MIL_CACHE[path] = (bags, table[first, 0].astype(int))
    return _MIL_CACHE[path]


def run(opts: Options) -> None:
    """k-fold CV bag accuracy of every model on the classical MIL data sets (../shared/mil_benchmarks)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from wsi_mil.mil.models import MODELS

    root = Path(opts.mil_dir)
    if not root.is_dir():
        print(f"\n== mil: {root} not found; skipped")
        return
    names = list(opts.mil_models) or sorted(MODELS)
    data = list(opts.mil_data) or MIL_DATA
    folds, epochs, repeats = opts.mil_folds, opts.mil_epochs, opts.mil_repeats
    if opts.quick:  # the smoke run: one data set, 2 folds, 2 epochs
        data, folds, epochs, repeats = data[:1], 2, 2, 1
    recipe = opts.mil_recipe
    if recipe == "ilse2018":
        overrides = [f"train.batch_size={opts.mil_batch}", f"train.epochs={epochs}", f"train.min_epochs={epochs}"]
        what = f"configs/mil/ilse2018.yaml with {' '.join(overrides)}"
    else:
        overrides = ["train.num_workers=0"]
        what = ("the packaged defaults (AdamW, class-weighted loss, early stopping on 20% of each training fold, "
                "default layer sizes)")
    if opts.mil_set:
        overrides = [*overrides, *opts.mil_set]
        what += f", with {' '.join(opts.mil_set)}"
    print(f"\n== mil: {folds}-fold CV bag accuracy x {repeats} repeat(s) (folds reshuffled per repeat, the same "
          f"for every model), {what}, 2 processes")
    jobs = [(str(root / f"{d}.csv.gz"), n, r, k, folds, overrides, recipe)
            for d in data for r in range(repeats) for n in names for k in range(folds)]
    tally: dict = {}  # (data, model) -> {repeat: [correct, total, seconds, folds done]}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        for d, n, r, correct, total, sec in pool.map(_mil_job, jobs):
            t = tally.setdefault((d, n), {}).setdefault(r, [0, 0, 0.0, 0])
            t[0], t[1], t[2], t[3] = t[0] + correct, t[1] + total, t[2] + sec, t[3] + 1
            if t[3] == folds:
                print(f"  {d:22s} {n:12s} repeat {r}: accuracy {t[0] / t[1]:.3f} ({t[2]:.0f} s)", flush=True)
    print("\n| model | " + " | ".join(data) + " |\n|---|" + "---|" * len(data))
    for n in names:  # each repeat's accuracy pools its folds' test bags; mean ± std over repeats
        cells = []
        for d in data:
            accs = [c / t for c, t, _, _ in tally[(d, n)].values()]
            cells.append(f"{np.mean(accs):.3f}" + (f" ± {np.std(accs, ddof=1):.3f}" if len(accs) > 1 else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")
    _default_vs_pooling(tally, data)


def _default_vs_pooling(tally: dict, data: list[str]) -> None:
    """The issue's bar, checked where all three ran: the default head at least as accurate as the better of
    mean and max pooling (mean accuracy over repeats; with repeats, the repeats where it is behind)."""
    from wsi_mil.config import ModelConfig

    default = ModelConfig().name
    for d in data:
        runs = {n: tally.get((d, n)) for n in (default, "meanpool", "maxpool")}
        if not all(runs.values()):
            continue
        acc = {n: {r: c / t for r, (c, t, _, _) in reps.items()} for n, reps in runs.items()}
        mean = {n: float(np.mean(list(a.values()))) for n, a in acc.items()}
        best = max(("meanpool", "maxpool"), key=mean.get)
        behind = sum(acc[default][r] < max(acc["meanpool"][r], acc["maxpool"][r]) for r in acc[default])
        verdict = "holds" if mean[default] >= mean[best] else "does NOT hold"
        print(f"  {d}: default {default} {mean[default]:.3f} vs better pooling {best} {mean[best]:.3f}: {verdict} "
              f"(behind the better pooling in {behind} of {len(acc[default])} repeat(s))")
