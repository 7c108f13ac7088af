"""mil: repeated k-fold CV bag accuracy and AUROC of every head on the classical MIL data sets
(../shared/mil_benchmarks). Accuracy alone says little on corel dogs, where 0.950 is the all-negative answer.

Each fold's result is kept in ``CACHE/mil/`` under a name that hashes everything that decides it (the
data file's sha256, head, repeat, fold, fold count, overrides, recipe file, and wsi_mil's source), so a
killed or stopped run goes on from the folds it finished, and a code change starts afresh."""

from __future__ import annotations

import hashlib
import json
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
    return (Path(path).name.split(".")[0], name, repeat, correct, len(test_idx), time.perf_counter() - t0,
            probs[:, 1].tolist(), y[test_idx].tolist())


def _source_digest() -> str:
    """sha256 of wsi_mil's Python source and the recipe file: a fold result made by other code is not reused."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in sorted([*(root / "wsi_mil").rglob("*.py"), root / "configs" / "mil" / "ilse2018.yaml"]):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _result_file(folder: Path, job: tuple, source: str, data_sha: dict) -> Path:
    path, name, repeat, fold, folds, overrides, recipe = job
    key = json.dumps([data_sha[path], name, repeat, fold, folds, list(overrides), recipe, source])
    return folder / f"{Path(path).name.split('.')[0]}-{name}-r{repeat}-f{fold}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


FIELDS = ("data", "model", "repeat", "correct", "total", "seconds", "probs", "labels")  # a _mil_job result


def _stored(file: Path) -> tuple | None:
    """A fold result written by an earlier run (None if absent or unreadable: that fold runs again)."""
    try:
        r = json.loads(file.read_text())
        return tuple(r[k] for k in FIELDS)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(file: Path, result: tuple) -> None:
    from wsi_mil.atomic import write_json

    write_json(file, dict(zip(FIELDS, result)), indent=None)


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
    import os
    from concurrent.futures import ProcessPoolExecutor

    from wsi_mil.mil.models import MODELS
    from wsi_mil.runner.lifetime import end_with

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
    print(f"\n== mil: {folds}-fold CV bag accuracy and AUROC x {repeats} repeat(s) (folds reshuffled per repeat, the same "
          f"for every model), {what}, 2 processes")
    jobs = [(str(root / f"{d}.csv.gz"), n, r, k, folds, tuple(overrides), recipe)
            for d in data for r in range(repeats) for n in names for k in range(folds)]
    files = _result_files(opts.cache / "mil", jobs)
    done = {job: _stored(files[job]) for job in jobs}
    todo = [job for job in jobs if done[job] is None]
    if len(todo) < len(jobs):
        print(f"  {len(jobs) - len(todo)} of {len(jobs)} fold results reused from {opts.cache / 'mil'} (made by this "
              "code on these data; delete the folder to run them again)")
    tally: dict = {}  # (data, model) -> {repeat: [correct, total, seconds, folds done, probs, labels]}
    for job in jobs:
        if done[job] is not None:
            _add(tally, done[job], folds)
    if todo:
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=end_with,
                                 initargs=(os.getpid(),)) as pool:  # a killed bench takes its workers with it
            for job, result in zip(todo, pool.map(_mil_job, todo)):
                _store(files[job], result)  # as each fold ends: a killed run resumes from here
                _add(tally, result, folds)
    print(_table(tally, names, data))


def _result_files(folder: Path, jobs: list[tuple]) -> dict:
    from wsi_mil.atomic import file_sha256

    source = _source_digest()
    data_sha = {path: file_sha256(path) for path in {job[0] for job in jobs}}
    return {job: _result_file(folder, job, source, data_sha) for job in jobs}


def _add(tally: dict, result: tuple, folds: int) -> None:
    """One fold's result into its repeat's tally; the repeat's line once its last fold is in."""
    d, n, r, correct, total, sec, probs, labels = result
    t = tally.setdefault((d, n), {}).setdefault(r, [0, 0, 0.0, 0, [], []])
    t[0], t[1], t[2], t[3] = t[0] + correct, t[1] + total, t[2] + sec, t[3] + 1
    t[4] += probs
    t[5] += labels
    if t[3] == folds:
        print(f"  {d:22s} {n:20s} repeat {r}: accuracy {t[0] / t[1]:.3f}, AUROC {_auroc(t):.3f} "
              f"({t[2]:.0f} s)", flush=True)


def _auroc(t: list) -> float:
    """The AUROC of one repeat's pooled out-of-fold probabilities."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t[5], t[4])) if len(set(t[5])) == 2 else float("nan")


def _table(tally: dict, names: list[str], data: list[str]) -> str:
    """Markdown: accuracy and AUROC per data set, each pooled over a repeat's test bags; mean ± std over
    the repeats."""
    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")

    lines = ["| model | " + " | ".join(f"{d} acc | {d} AUROC" for d in data) + " |",
             "|---|" + "---|---|" * len(data)]
    for n in names:
        cells = []
        for d in data:
            reps = list(tally[(d, n)].values())
            cells += [cell([t[0] / t[1] for t in reps]), cell([_auroc(t) for t in reps])]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines)
