"""spatial: spatial digits-bags (a contiguous block of target digits on a 7 x 7 grid makes a bag positive;
negatives hold as many target digits, isolated), bag and block-instance AUROC of every head with the grid cells and
without them (the same bags, cells dropped), so the table says whether knowing positions helps."""

from __future__ import annotations

import time

from .options import Options


def run(opts: Options) -> None:
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.mil.digits import evaluate, spatial_digits_bags, without_positions
    from wsi_mil.mil.models import MODELS
    from wsi_mil.mil.train import fit

    n_train, n_test, epochs = (60, 40, 2) if opts.quick else (400, 200, 30)
    train, test, inst = spatial_digits_bags(n_train=n_train, n_test=n_test, seed=0)
    print(f"\n== spatial: spatial digits-bags ({n_train} train bags, {n_test} test, 7 x 7 grid; positive = a "
          f"2x2/2x3 block of 9s, negatives as many isolated 9s, every bag 0-1 more isolated), {epochs} epochs, "
          f"batch 8, lr 2e-3{' ' + ' '.join(opts.spatial_set) if opts.spatial_set else ''}, "
          f"CPU {torch.get_num_threads()} threads")
    print("  head                  uses positions  bag AUROC (cells / none)  block AUROC (cells / none)  "
          "seconds (cells / none)")
    names = ["abmil", "sm_abmil"] if opts.quick else list(opts.spatial_models) or sorted(MODELS)  # quick: one of each
    for name in names:
        cfg = load_config(None, [f"model.name={name}", "model.hidden_dim=64", "model.attention_dim=32",
                                 "model.dropout=0.0", f"train.epochs={epochs}", f"train.min_epochs={epochs}",
                                 "train.lr=0.002", "train.batch_size=8", *opts.spatial_set])
        got = []
        for with_cells in (True, False) if MODELS[name].uses_positions else (True,):
            tr, te = (train, test) if with_cells else (without_positions(train), without_positions(test))
            t0 = time.perf_counter()
            res = fit(tr, [], 64, 2, cfg.model, cfg.train, seed=0)
            got.append((*evaluate(res.model, te, inst), time.perf_counter() - t0))
        if len(got) == 1:  # a head that does not read positions gives the same numbers without them
            got.append(got[0])
        (bag_c, inst_c, sec_c), (bag_n, inst_n, sec_n) = got
        uses = "yes" if MODELS[name].uses_positions else "no"
        print(f"  {name:20s}  {uses:14s}  {bag_c:.3f} / {bag_n:.3f}             {inst_c:.3f} / {inst_n:.3f}"
              f"               {sec_c:.1f} / {sec_n:.1f}", flush=True)
