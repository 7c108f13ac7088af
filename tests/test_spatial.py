"""Heads that use the patches' positions: the grid graph, the smooth operator, the graph convolution and
the smoothness prior restated against independent dense computations, the cells a bag carries, and a
spatial head through train, predict and heatmap on real stage outputs."""

import csv
import json
from itertools import product

import numpy as np
import pytest
import torch

from wsi_mil.cli import main
from wsi_mil.formats import read_bag_cells, read_grid_index
from wsi_mil.mil.data import Bag, BagCache, side_by_side
from wsi_mil.mil.models import build_model
from wsi_mil.mil.models.graph import Sm, grid_graph


def _random_cells(rng, b=3, n=40, side=9):
    cells = torch.stack([torch.from_numpy(rng.choice(side * side, n, replace=False)) for _ in range(b)])
    coords = torch.stack([cells % side, cells // side], -1) + torch.from_numpy(rng.integers(0, 500, (b, 1, 2)))
    mask = torch.from_numpy(rng.random((b, n)) < 0.8)
    return coords.long(), mask


def _dense_adjacency(coords, mask) -> np.ndarray:
    """A[b, i, j] = 1 when i != j are present in bag b and their cells touch (Chebyshev distance 1): by loops."""
    b, n = mask.shape
    a = np.zeros((b, n, n))
    for k, i, j in product(range(b), range(n), range(n)):
        if i != j and mask[k, i] and mask[k, j] and int((coords[k, i] - coords[k, j]).abs().max()) == 1:
            a[k, i, j] = 1
    return a


def _edges(graph, n) -> set:
    return {(int(s) // n, int(s) % n, int(d) % n) for s, d in zip(graph.src, graph.dst)}


def test_the_grid_graph_is_the_8_neighbourhood_of_present_cells():
    rng = np.random.default_rng(0)
    coords, mask = _random_cells(rng)
    graph = grid_graph(coords, mask)
    dense = _dense_adjacency(coords, mask)
    assert _edges(graph, mask.shape[1]) == {tuple(e) for e in np.argwhere(dense > 0)}
    np.testing.assert_array_equal(graph.degree.reshape(mask.shape).numpy(), dense.sum(2))
    assert len(grid_graph(None, mask).src) == 0  # no positions: no edges
    from wsi_mil.mil.models.graph import bag_edges

    cells = coords[0, mask[0]]
    assert bag_edges(cells)[0] is bag_edges(cells.clone())[0]  # built once per bag content


def test_the_smooth_operator_is_the_closed_form_it_approximates():
    """Castro-Macías et al. 2024: Sm(U) = (1 - a)(I - a Â)^-1 U = argmin a/(1-a) tr(G^T L G) + ||G - U||^2,
    with Â the symmetric normalised adjacency; 200 fixed-point steps reach it."""
    rng = np.random.default_rng(1)
    coords, mask = _random_cells(rng, b=2, n=30, side=7)
    u = torch.randn(2, 30, 5, dtype=torch.float64)
    alpha = 0.6
    got = Sm(alpha, steps=200)(u, grid_graph(coords, mask)).numpy()
    a = _dense_adjacency(coords, mask)
    for k in range(2):
        deg = a[k].sum(1)
        inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0.0)
        a_hat = inv[:, None] * a[k] * inv[None, :]
        want = (1 - alpha) * np.linalg.solve(np.eye(30) - alpha * a_hat, u[k].numpy())
        np.testing.assert_allclose(got[k], want, atol=1e-8)
        lap = np.eye(30) - a_hat  # the minimiser's stationarity: (I + gamma L) G = U
        np.testing.assert_allclose((np.eye(30) + alpha / (1 - alpha) * lap) @ got[k], u[k].numpy(), atol=1e-8)


def test_patch_gcn_aggregates_with_a_softmax_over_each_patchs_neighbours():
    """DeeperGCN's softmax aggregation, per channel: sum_j softmax_j(t m_ij) m_ij, m_ij = ReLU(h_j) + eps."""
    from wsi_mil.mil.models.patch_gcn import GENConv

    rng = np.random.default_rng(2)
    coords, mask = _random_cells(rng, b=2, n=25, side=6)
    conv = GENConv(4).double()
    with torch.no_grad():
        conv.t.fill_(1.7)
    h = torch.randn(2, 25, 4, dtype=torch.float64)
    got = conv.aggregate(h, grid_graph(coords, mask)).detach().numpy()
    a = _dense_adjacency(coords, mask)
    for k, i in product(range(2), range(25)):
        nb = np.flatnonzero(a[k, i])
        if len(nb) == 0:
            assert np.allclose(got[k, i], 0)
            continue
        m = np.maximum(h[k, nb].numpy(), 0) + 1e-7
        w = np.exp(1.7 * m) / np.exp(1.7 * m).sum(0)
        np.testing.assert_allclose(got[k, i], (w * m).sum(0), rtol=1e-9)


def test_prob_smooth_kl_is_the_smooth_prior_term_on_the_grid():
    """Castro-Macías et al. 2025: KL = (1/N)[mu^T (I - Â) mu + sum sigma^2 - 1/2 sum log sigma^2] per bag."""
    torch.manual_seed(0)
    model = build_model({"name": "prob_smooth_abmil", "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0}, 6, 2).double()
    rng = np.random.default_rng(3)
    coords, mask = _random_cells(rng, b=2, n=20, side=6)
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    got = float(model(x, mask, coords).aux["kl"].detach())
    hh = model.mlp(model.embed(x))
    mu, log_var = model.mu(hh)[..., 0].detach().numpy(), model.log_var(hh)[..., 0].detach().numpy()
    a = _dense_adjacency(coords, mask)
    want = []
    for k in range(2):
        keep = mask[k].numpy()
        sub = a[k][np.ix_(keep, keep)]
        deg = sub.sum(1)
        inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0.0)
        lap = np.eye(keep.sum()) - inv[:, None] * sub * inv[None, :]
        m, lv = mu[k, keep], log_var[k, keep]
        want.append((m @ lap @ m + np.exp(lv).sum() - 0.5 * lv.sum()) / keep.sum())
    assert got == pytest.approx(np.mean(want), rel=1e-9)


def test_camil_neighbour_attention_sums_query_key_products_over_touching_patches():
    """CAMIL: w_i = sum_{j in N(i)} q_i . k_j / sqrt(d), restated by loops over the dense adjacency."""
    torch.manual_seed(0)
    model = build_model({"name": "camil", "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0, "heads": 2},
                        6, 2).double().eval()
    rng = np.random.default_rng(4)
    coords, mask = _random_cells(rng, b=1, n=16, side=5)
    x = torch.randn(1, 16, 6, dtype=torch.float64)
    captured = {}
    model.v.register_forward_hook(lambda mod, inp, out: captured.update(t=inp[0]))
    out = model(x, mask, coords)
    t = captured["t"][0]
    q, k = model.qk(t).chunk(2, -1)
    a = _dense_adjacency(coords, mask)[0]
    q, k = q.detach(), k.detach()
    w = np.array([sum(float(q[i] @ k[j]) for j in np.flatnonzero(a[i])) / 2.0 for i in range(16)])
    keep = mask[0].numpy()
    local = np.zeros((16, 8))
    e = np.exp(w[keep] - w[keep].max())
    local[keep] = (e / e.sum())[:, None] * model.v(t).detach().numpy()[keep]
    gate = 1 / (1 + np.exp(-local))
    m = gate * local + (1 - gate) * t.detach().numpy()
    att = out.instance_scores[0].detach().numpy()
    s = np.exp(att[keep] - att[keep].max())
    z = (s / s.sum()) @ m[keep]
    want = z @ model.classifier.weight.detach().numpy().T + model.classifier.bias.detach().numpy()
    np.testing.assert_allclose(out.logits[0].detach().numpy(), want, rtol=1e-9)


def test_a_bag_carries_the_patch_grids_cells_and_a_patients_slides_never_touch(mapped):
    slides, out = mapped
    from wsi_mil.layout import Layout, slide_files

    layout = Layout(out)
    (enc,) = [p.name for p in (out / "features").iterdir() if p.is_dir()]
    files = slide_files(layout.features_dir(enc))
    for sid in ("m0", "m1"):
        np.testing.assert_array_equal(read_bag_cells(files[sid]), read_grid_index(layout.patches(sid)))
    cache = BagCache(1e9)
    patient = Bag("P", None, 0, "P", paths=(files["m0"], files["m1"]))
    cells = cache.cells(patient)
    assert len(cells) == len(read_grid_index(layout.patches("m0"))) + len(read_grid_index(layout.patches("m1")))
    n0 = len(read_grid_index(layout.patches("m0")))
    graph = grid_graph(cells[None], torch.ones(1, len(cells), dtype=torch.bool))
    assert len(graph.src) > 0 and not ((graph.src < n0) != (graph.dst < n0)).any()  # edges stay within a slide
    assert side_by_side([cells[:3], None]) is None


def test_a_spatial_head_trains_predicts_and_maps_with_the_grid(mapped, tmp_path):
    """sm_abmil through the real stages: the heatmap's scores and predict's row are the ensemble's on the
    patch grid's cells, and differ from the same model without positions (so the cells reached it)."""
    import h5py
    from conftest import SMALL_ENCODER

    from wsi_mil.layout import Layout
    from wsi_mil.mil.data import load_features
    from wsi_mil.mil.ensemble import Ensemble

    slides, out = mapped
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "label"], ["m0", "normal"], ["m1", "tumour"], ["glass", "normal"]])
    common = ["--out", str(out), "--no-progress", *SMALL_ENCODER, "train.run_name=spatial"]
    assert main(["train", *common, f"train.labels={labels}", "model.name=sm_abmil", "train.folds=1",
                 "train.val_fraction=0", "train.epochs=3", "model.hidden_dim=16", "model.attention_dim=8",
                 "model.kwargs.sm_alpha=0.8"]) == 0
    assert main(["heatmap", "--slides", str(slides), *common, "heatmap.precision=fp32"]) == 0
    assert main(["predict", "--out", str(out), "--no-progress", "--model", str(out / "models" / "spatial")]) == 0
    layout = Layout(out)
    ens = Ensemble(layout.run_dir("spatial"))
    path = layout.features(ens.meta.encoder_id, "m1")
    feats, cells = load_features(path), torch.from_numpy(read_grid_index(layout.patches("m1")))
    probs, scores = ens(feats, cells=cells)
    _, blind = ens(feats)
    with h5py.File(layout.heatmap_dir("spatial", "m1") / "scores.h5") as fh:
        np.testing.assert_allclose(fh["attention_logits"][:], scores, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, blind, atol=1e-4)
    with (out / "predictions" / "spatial.csv").open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["slide_id"] == "m1")
    assert float(row["prob_tumour"]) == pytest.approx(float(probs[1]), rel=1e-5)
    summary = json.loads(layout.heatmap_summary("spatial", "m1").read_text())
    assert summary["outputs"]["prob_tumour"] == pytest.approx(float(probs[1]), rel=1e-5)


@pytest.mark.parametrize("distill", ["maxmins", "maxs"])
def test_dtfd_distils_the_instances_its_grad_cam_ranks_first_and_last(distill):
    """DTFD-MIL's MaxMinS / MaxS: tier 2 sees the embeddings of the instances with the highest (and lowest)
    last-class probability softmax_c(W_1,c . a_k h_k) of each pseudo-bag, restated from the tier-1 pieces."""
    torch.manual_seed(0)
    model = build_model({"name": "dtfd_mil", "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0,
                         "kwargs": {"distill": distill, "groups": 3}}, 6, 2).double().eval()
    x = torch.randn(1, 11, 6, dtype=torch.float64)
    out = model(x, torch.ones(1, 11, dtype=torch.bool))
    h = model.embed(x[0]).detach()
    idx, present = model._groups(11, "cpu")
    picked = []
    for row, ok in zip(idx, present):
        hg = h[row[ok]]
        a = torch.softmax(model.att1(hg).squeeze(-1), 0)
        p = torch.softmax((a[:, None] * hg) @ model.cls1.weight.T, -1)[:, -1]
        picked.append(hg[p.argmax()])
        if distill == "maxmins":
            picked.append(hg[p.argmin()])
    d = torch.stack(picked)
    a2 = torch.softmax(model.att2(d).squeeze(-1), 0)
    want = model.cls2((a2[:, None] * d).sum(0))
    torch.testing.assert_close(out.logits[0], want.detach())  # the order of the distilled set does not matter


def test_dtfd_splits_a_batch_of_uneven_bags_as_it_splits_each_bag_alone():
    """The batched forward: an empty bag, one with fewer instances than pseudo-bags and longer ones, side by
    side, each get min(M, n) pseudo-bags, the tier-1 logits of their own split and the logits they get
    alone; in training the loss stays finite and every bag's gradient reaches the head."""
    torch.manual_seed(1)
    model = build_model({"name": "dtfd_mil", "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0,
                         "kwargs": {"groups": 4}}, 6, 2).double().eval()
    lens = [0, 2, 9, 17]
    x = torch.randn(len(lens), 20, 6, dtype=torch.float64)
    mask = torch.arange(20)[None] < torch.tensor(lens)[:, None]
    out = model(x, mask)
    owner = out.aux["pseudo_owner"].tolist()
    assert [owner.count(b) for b in range(len(lens))] == [min(4, n) for n in lens]
    for b, n in enumerate(lens):
        alone = model(x[b:b + 1, :n], mask[b:b + 1, :n])
        torch.testing.assert_close(out.logits[b], alone.logits[0])
        torch.testing.assert_close(out.aux["pseudo_logits"][torch.tensor(owner) == b], alone.aux["pseudo_logits"])
    model.train()
    loss = model.compute_loss(model(x, mask), torch.tensor([0, 1, 0, 1]))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_spatial_digits_bags_tell_classes_apart_only_by_arrangement():
    """Positive bags hold a contiguous block of target digits, negative bags as many isolated ones (none
    touching another), so the count of target digits is the same in both classes."""
    from wsi_mil.mil.digits import spatial_digits_bags, without_positions

    train, test, inst = spatial_digits_bags(n_train=60, n_test=40, seed=3)
    for bag, block in zip(test, inst):
        cells = bag.cells.numpy()
        assert len(np.unique(cells, axis=0)) == len(cells) == 49
        assert bool(block.any()) == bool(bag.label)
        if block.any():
            b = cells[block == 1]
            span = b.max(0) - b.min(0) + 1
            assert sorted(span.tolist()) in ([2, 2], [2, 3]) and len(b) == span.prod()  # a filled rectangle
    counts = {0: [], 1: []}
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    nines = {tuple(r) for r in (X[y == 9] / 16.0).astype(np.float32)}
    for bag in train:
        is_nine = np.array([tuple(r) in nines for r in bag.features.numpy()])
        counts[bag.label].append(int(is_nine.sum()))
    assert set(counts[0]) == set(counts[1]) == {4, 5, 6, 7}  # counting the 9s cannot separate the classes
    assert abs(np.mean(counts[0]) - np.mean(counts[1])) < 0.5
    assert all(b.cells is None for b in without_positions(train))


def test_knowing_positions_lets_a_smooth_head_find_the_block():
    """sm_abmil on spatial digits-bags, the same bags with and without their cells: the cells raise the
    bag AUROC (the arrangement is the label; without positions it is a coin toss) and the map finds the
    block, not the isolated target digits."""
    from wsi_mil.config import load_config
    from wsi_mil.mil.digits import evaluate, spatial_digits_bags, without_positions
    from wsi_mil.mil.train import fit

    train, test, inst = spatial_digits_bags(n_train=400, n_test=100, seed=0)
    cfg = load_config(None, ["model.name=sm_abmil", "model.hidden_dim=64", "model.attention_dim=32",
                             "model.dropout=0.0", "train.epochs=30", "train.min_epochs=30", "train.lr=0.002",
                             "train.batch_size=8"])
    with_cells = evaluate(fit(train, [], 64, 2, cfg.model, cfg.train, seed=0).model, test, inst)
    blind = evaluate(fit(without_positions(train), [], 64, 2, cfg.model, cfg.train, seed=0).model,
                     without_positions(test), inst)
    assert with_cells[0] >= blind[0] + 0.2, (with_cells, blind)  # blind, the classes look alike (~0.5)
    assert with_cells[1] >= 0.9, with_cells
