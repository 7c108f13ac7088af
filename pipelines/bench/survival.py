"""survival: digits-bags survival, c-index per head vs the oracle's, instance AUROC, and epoch seconds with
the Cox batch loss vs the discrete-time NLL (same bags, same head, same run)."""

from __future__ import annotations

import statistics

from .options import Options


def run(opts: Options) -> None:
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.mil.digits import digits_survival_bags, evaluate_survival
    from wsi_mil.mil.models import MODELS
    from wsi_mil.mil.tasks import task_class
    from wsi_mil.mil.train import fit

    n_train, n_test, epochs = (120, 80, 3) if opts.quick else (1200, 500, 40)
    train, test, inst, log_h = digits_survival_bags(n_train=n_train, n_test=n_test, seed=0)
    print(f"\n== survival: digits-bags survival ({n_train} train bags, {n_test} test; hazard 0.1 exp(1.5 k), "
          f"k target digits), {epochs} epochs, batch 16, CPU {torch.get_num_threads()} threads")
    print("  head          loss  c-index  oracle  gap    instance AUROC  median epoch s")
    epoch_s: dict[str, list[float]] = {"nll": [], "cox": []}
    for name in sorted(MODELS):
        for loss in ("nll", "cox"):
            cfg = load_config(None, [f"model.name={name}", "model.hidden_dim=64", "model.attention_dim=32",
                                     "model.dropout=0.0", f"train.epochs={epochs}", f"train.min_epochs={epochs}",
                                     "train.lr=0.002", "train.batch_size=16", "train.task=survival",
                                     f"train.survival.loss={loss}", "train.survival.bins=8"])
            task = task_class("survival")({}, cfg.train).for_fold(train)
            res = fit(task.fold_bags(train), [], 64, 0, cfg.model, cfg.train, seed=0, task=task)
            got = evaluate_survival(res.model, task, test, inst, log_h)
            sec = statistics.median(h["seconds"] for h in res.history[1:] or res.history)
            epoch_s[loss].append(sec)
            claim = "" if res.model.localises else "  (no localisation claimed)"
            print(f"  {name:12s}  {loss:4s}  {got['c_index']:.3f}    {got['oracle_c_index']:.3f}   "
                  f"{got['oracle_c_index'] - got['c_index']:+.3f}  {got['instance_auroc']:.3f}           "
                  f"{sec:.3f}{claim}", flush=True)
    ratio = statistics.median(c / n for c, n in zip(epoch_s["cox"], epoch_s["nll"]))
    print(f"  epoch time Cox / NLL, median over heads: {ratio:.2f}")
