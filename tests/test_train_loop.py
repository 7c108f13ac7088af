"""The training loop at WSI scale (issue 23): a batch of one bag is a view, not a padded copy; cached bags
live in memory of their own, so evicting one gives it back while the steps keep their heap; bf16
autocast on the CPU where it is native trains every head, and gives the metrics fp32 gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from wsi_mil.config import load_config
from wsi_mil.mil import train as train_mod
from wsi_mil.mil.data import pad_batch
from wsi_mil.mil.digits import digits_bags, evaluate
from wsi_mil.mil.models import MODELS, build_model
from wsi_mil.mil.train import WithLoss, fit


def test_one_bag_is_a_view_of_its_features_and_a_batch_of_two_is_padded():
    feats, cells = torch.randn(50, 8), torch.randint(0, 9, (50, 2))
    x, mask, y, coords = pad_batch([(feats, 1, cells)])
    assert x.shape == (1, 50, 8) and x.data_ptr() == feats.data_ptr()  # no copy of the bag
    assert mask.all() and mask.shape == (1, 50) and y.tolist() == [1]
    assert coords.data_ptr() == cells.data_ptr() and torch.equal(coords[0], cells)
    half = feats.half()
    xh = pad_batch([(half, 0, None)])[0]
    assert xh.dtype == torch.float32 and torch.equal(xh[0], half.float())  # converted only when it must be
    other = torch.randn(30, 8)
    x2, mask2, y2, coords2 = pad_batch([(feats, 1, cells), (other, 0, cells[:30])])
    assert x2.shape == (2, 50, 8) and mask2.sum(1).tolist() == [50, 30] and not x2[1, 30:].any()
    assert torch.equal(x2[0], feats) and torch.equal(coords2[1, :30], cells[:30]) and y2.tolist() == [1, 0]
    empty_x, empty_mask, _, _ = pad_batch([(torch.zeros(0, 8), 0, None)])  # an empty bag keeps its padded row
    assert empty_x.shape == (1, 1, 8) and not empty_mask.any()


def _bags_and_target(name: str):
    torch.manual_seed(0)
    small = {"name": name, "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0}
    model = build_model(small, 16, 3)
    x = torch.randn(1, 12, 16)
    cells = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij"), -1).reshape(1, 12, 2)
    return model, x, torch.ones(1, 12, dtype=torch.bool), cells, torch.tensor([2])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_head_trains_a_step_under_cpu_bf16_autocast(name, monkeypatch):
    """The head runs under autocast, its loss in fp32 (WithLoss, as fit runs it): every registered head
    must take bf16 activations into its loss (CLAM's instance classifiers once did not). And no head may
    write into its input: a bag per step is now a view of the cached bag, so that would corrupt the
    cache for every later epoch."""
    monkeypatch.setattr(train_mod, "native_bf16", lambda: True)
    model, x, mask, cells, y = _bags_and_target(name)
    before = (x.clone(), cells.clone())
    model.train()
    seen = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.logits.dtype))
    loss = WithLoss(model, amp=True)(x, mask, cells, y)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert torch.equal(x, before[0]) and torch.equal(cells, before[1])


def test_train_amp_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(train_mod, "native_bf16", lambda: False)
    model, x, mask, cells, y = _bags_and_target("abmil")
    seen = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.logits.dtype))
    WithLoss(model, amp=True)(x, mask, cells, y)
    assert seen == [torch.float32]


def test_bf16_autocast_on_the_cpu_gives_the_metrics_fp32_gives(monkeypatch):
    """The measured claim behind ``train.amp`` on native-bf16 CPUs, on digits-bags: bag and instance AUROC
    of the same seed within 0.03 of fp32's, and the bf16 run really differs (it is not fp32 again)."""
    monkeypatch.setattr(train_mod, "native_bf16", lambda: True)
    train, test, inst = digits_bags(n_train=120, n_test=80, seed=4)
    cfg = load_config(None, ["model.hidden_dim=64", "model.attention_dim=32", "model.dropout=0.0",
                             "train.epochs=12", "train.min_epochs=12", "train.lr=0.002"])
    results, weights = {}, {}
    for amp in (False, True):
        tcfg = cfg.train.model_copy(update={"amp": amp})
        res = fit(train, [], 64, 2, cfg.model, tcfg, seed=0)
        results[amp] = evaluate(res.model, test, inst)
        weights[amp] = next(res.model.parameters()).detach().clone()
    assert not torch.equal(weights[False], weights[True])
    assert abs(results[True][0] - results[False][0]) <= 0.03, results
    assert abs(results[True][1] - results[False][1]) <= 0.03, results
    assert results[False][0] > 0.9  # both learnt the task, so the comparison means something


PROBE = textwrap.dedent("""
    import numpy as np, torch
    from wsi_mil.runner.memory import heap_for_steps, mapped_empty
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20
    n = 50 * 2**20  # 200 MB of float32
    base = rss()
    with heap_for_steps():
        a = np.ones(n, np.float32); del a
        kept = rss()                            # steps keep their freed heap for the next step
        m = torch.from_numpy(mapped_empty((n,), np.float32)); m.fill_(1.0)
        held = rss(); del m
        evicted = rss()                         # a cached bag's own mapping goes back at once
    after = rss()                               # leaving trims the heap
    print(base, kept, held, evicted, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings, /proc/self/statm")
def test_steps_keep_their_heap_while_an_evicted_bag_gives_its_memory_back():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    base, kept, held, evicted, after = map(float, out.split())
    assert kept - base > 150, out  # 200 MB freed inside heap_for_steps stays ours for the next step
    assert held - kept > 150 and held - evicted > 150, out  # the mapped bag counted, then returned
    assert kept - after > 150, out  # and the kept heap is trimmed on the way out


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fit_steps_with_the_fused_optimizer_and_its_update_is_the_per_tensor_loops(optimizer):
    """make_optimizer runs PyTorch's fused Adam(W) on the CPU; fed the same gradients for a few steps,
    it moves a head's weights where the per-tensor loop (torch's CPU default) moves them, weight decay
    and bias correction included. (The same gradients: recomputed from two models, a parameter whose
    gradient is zero up to rounding, like the bias before a softmax, turns one ulp into lr-sized steps.)"""
    cfg = load_config(None, [f"train.optimizer={optimizer}", "train.lr=0.01", "train.weight_decay=0.05",
                             "model.name=abmil_gated"])
    torch.manual_seed(0)
    fused_model, loop_model = build_model(cfg.model, 12, 2), build_model(cfg.model, 12, 2)
    loop_model.load_state_dict(fused_model.state_dict())
    fused = train_mod.make_optimizer(fused_model, cfg.train)
    assert all(g["fused"] for g in fused.param_groups)
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    loop = cls(loop_model.parameters(), lr=0.01, weight_decay=0.05, betas=(0.9, 0.999), foreach=False)
    start = [p.detach().clone() for p in fused_model.parameters()]
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b, s0 in zip(fused_model.parameters(), loop_model.parameters(), start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert float((a.detach() - s0).abs().mean()) > 1e-3  # every tensor moved, so the comparison has teeth
