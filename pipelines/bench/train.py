"""train: training end to end vs pure forward+backward, epoch time per head, digits-bags AUROCs, and the WSI-scale
row (:mod:`.wsi_train`: 20,000-instance bags, vs the pure step and CLAM's own loop)."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

from . import wsi_train
from .common import pure_pass
from .options import Options


def _end_to_end(bags, dim: int, amp: bool) -> None:
    """(a) fit's epochs vs (b) the pure forward + backward + step on the same tensors, pre-batched, in
    the same precision and allocator setting, so the ratio is the loop's alone; interleaved rounds."""
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.mil.data import BagCache, BagDataset, pad_batch
    from wsi_mil.mil.models import build_model
    from wsi_mil.mil.train import fit, make_optimizer

    cfg = load_config(None, ["train.epochs=3", "train.min_epochs=3", "train.balance=none", f"train.amp={str(amp).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, dim, 2)
    opt = make_optimizer(model, cfg.train)  # fit's optimizer
    ds = BagDataset(bags, BagCache(0))
    batches = [pad_batch([ds[i]]) for i in range(len(bags))]

    pure_pass(model, opt, batches, amp)  # warm-up
    fit_s, pure_s = [], []
    for _ in range(2):  # interleaved rounds, so drift on a shared machine hits both sides alike
        history = fit(bags, [], dim, 2, cfg.model, cfg.train, seed=0).history
        fit_s += [h["seconds"] for h in history[1:]]  # epochs timed by fit itself; the first warms up
        pure_s.append(pure_pass(model, opt, batches, amp))
    epoch_s, sec = statistics.median(fit_s), statistics.median(pure_s)
    a, b = len(bags) / epoch_s, len(bags) / sec
    label = "bf16 autocast" if amp else "fp32"
    print(f"  {label}: (a) training end to end : {a:7.1f} bags/s  (median epoch {epoch_s:.2f} s)")
    print(f"  {label}: (b) pure forward+backward: {b:7.1f} bags/s  (same tensors, already batched in memory)")
    print(f"  {label}: a/b = {a / b:.2f}")


def _optimizer_row(quick: bool) -> None:
    """fit with its fused Adam(W) vs the same fit with torch's per-tensor loop (the CPU default) on
    classical-MIL-sized bags, where the optimizer's per-tensor calls weigh most; interleaved rounds. The
    weights part by ~1e-3 over a few hundred steps (predicted probabilities by ~1e-4): the kernels round
    an ulp apart (fed the same gradients they agree to 1e-6, tests/test_train_loop.py), and Adam's
    normalisation grows such differences on weights whose gradients are near zero."""
    from unittest import mock

    import torch

    from wsi_mil.config import load_config
    from wsi_mil.mil.data import Bag
    from wsi_mil.mil.train import fit, make_optimizer

    loop_optimizer = functools.partial(make_optimizer, fused=False)

    n_bags, n_inst, dim, epochs = (12, 30, 166, 2) if quick else (60, 30, 166, 6)
    g = torch.Generator().manual_seed(0)
    bags = [Bag(f"b{i}", torch.randn(n_inst, dim, generator=g), i % 2, f"p{i}") for i in range(n_bags)]
    cfg = load_config(None, [f"train.epochs={epochs}", f"train.min_epochs={epochs}", "train.balance=none"])
    times: dict = {"fused": [], "loop": []}
    weights = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the classical-MIL bench runs: on bags this small threads only add waiting
    for _ in range(1 if quick else 3):
        for side in ("fused", "loop"):
            patch = mock.patch("wsi_mil.mil.train.make_optimizer", loop_optimizer) if side == "loop" \
                else contextlib.nullcontext()
            with patch:
                res = fit(bags, [], dim, 2, cfg.model, cfg.train, seed=0)
            times[side] += [h["seconds"] for h in res.history[1:]]
            weights[side] = [p.detach() for p in res.model.parameters()]
    torch.set_num_threads(threads)
    fused, loop = statistics.median(times["fused"]), statistics.median(times["loop"])
    diff = max(float((a - b).abs().max()) for a, b in zip(weights["fused"], weights["loop"]))
    print(f"  optimizer ({n_bags} bags x {n_inst} x {dim}, {cfg.model.name}, {cfg.train.optimizer}, 1 thread): fused "
          f"{fused:.3f} s/epoch vs per-tensor loop {loop:.3f} s: loop/fused {loop / fused:.2f}; largest weight "
          f"difference after {epochs} epochs {diff:.1e}")


def _three_convolutions(self, x, side: int):
    """PPEG as the authors run it: three depthwise convolutions (7, 5, 3) summed with the identity."""
    import torch

    cls, feat = x[:, :1], x[:, 1:]
    grid = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    grid = grid + self.convs[0](grid) + self.convs[1](grid) + self.convs[2](grid)
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


def _ppeg_row(quick: bool) -> None:
    """TransMIL's step with PPEG as one summed 7x7 convolution (ours) vs its three convolutions, on a
    corel-sized bag and a WSI-sized one; the same model and tensors, interleaved rounds."""
    from unittest import mock

    import torch

    from wsi_mil.mil.models import create_model

    for n, dim, reps in ((9, 230, 40 if quick else 300), (400, 256, 5) if quick else (4000, 1024, 15)):
        torch.manual_seed(0)
        model = create_model("transmil", dim, 2).eval()  # eval: no dropout, so both sides compute one function
        x, mask = torch.randn(1, n, dim), torch.ones(1, n, dtype=torch.bool)
        times: dict = {"merged": [], "three": []}
        logits = {}
        for _ in range(3):
            for side in ("merged", "three"):
                patch = mock.patch("wsi_mil.mil.models.transmil.PPEG.forward", _three_convolutions) \
                    if side == "three" else contextlib.nullcontext()
                with patch:
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        out = model(x, mask)
                        out.logits.sum().backward()
                    times[side].append((time.perf_counter() - t0) / reps)
                    logits[side] = out.logits.detach()
        merged, three = min(times["merged"]), min(times["three"])
        diff = float((logits["merged"] - logits["three"]).abs().max())
        print(f"  TransMIL PPEG, a bag of {n} x {dim}: forward+backward {three * 1e3:.1f} ms with three convolutions, "
              f"{merged * 1e3:.1f} ms merged: three/merged = {three / merged:.2f}; logits differ by {diff:.1e}")


def run(opts: Options) -> None:
    quick = opts.quick
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.device import native_bf16
    from wsi_mil.mil.data import Bag
    from wsi_mil.mil.digits import digits_bags, evaluate
    from wsi_mil.mil.models import MODELS
    from wsi_mil.mil.train import fit

    n_bags, n_inst, dim = (12, 200, 256) if quick else (200, 2000, 1024)
    cfg = load_config(None, [])
    print(f"\n== train: {n_bags} bags x {n_inst} instances x {dim} dims, {cfg.model.name}, "
          f"{cfg.train.batch_size} bag per step, CPU {torch.get_num_threads()} threads, native bf16: {native_bf16()}")
    g = torch.Generator().manual_seed(0)
    bags = [Bag(f"b{i}", torch.randn(n_inst, dim, generator=g), i % 2, f"p{i}") for i in range(n_bags)]
    for amp in ([False, True] if native_bf16() else [False]):
        _end_to_end(bags, dim, amp)
    _optimizer_row(quick)
    _ppeg_row(quick)

    print(f"  epoch seconds per model ({n_bags} x {n_inst} x {dim}, one bag per step, 2nd epoch):")
    for name in sorted(MODELS):
        mcfg = load_config(None, [f"model.name={name}", "train.epochs=2", "train.min_epochs=2", "train.balance=none"])
        history = fit(bags, [], dim, 2, mcfg.model, mcfg.train, seed=0).history
        print(f"    {name:12s} {history[-1]['seconds']:7.2f} s", flush=True)

    n_train, n_test, epochs = (60, 40, 3) if quick else (200, 100, 30)
    train, test, inst = digits_bags(n_train=n_train, n_test=n_test, seed=0)
    print(f"  digits-bags ({n_train} train bags, {n_test} test, target digit 9, {epochs} epochs): bag AUROC / "
          "instance AUROC")
    for name in sorted(MODELS):
        dcfg = load_config(None, [f"model.name={name}", "model.hidden_dim=64", "model.attention_dim=32",
                                  "model.dropout=0.0", f"train.epochs={epochs}", "train.lr=0.002", "train.batch_size=8"])
        t0 = time.perf_counter()
        res = fit(train[n_train // 5:], train[:n_train // 5], 64, 2, dcfg.model, dcfg.train, seed=0)
        bag_auc, instance_auc = evaluate(res.model, test, inst)
        claim = "" if res.model.localises else "  (no localisation claimed)"
        print(f"    {name:12s} {bag_auc:.3f} / {instance_auc:.3f}  ({time.perf_counter() - t0:.1f} s){claim}", flush=True)
    wsi_train.run(opts)
