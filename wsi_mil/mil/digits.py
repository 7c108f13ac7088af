"""Digits-bags: the MNIST-bags benchmark of Ilse et al. 2018, built from sklearn's bundled 8x8 digits.

A bag holds digit images (64-d pixel features); it is positive iff it holds the target digit. Train and
test bags draw from disjoint images. Instance labels are returned to score attention.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from .data import Bag


def digits_bags(n_train: int = 200, n_test: int = 100, mean_size: int = 10, std_size: float = 2.0,
                target: int = 9, seed: int = 0) -> tuple[list[Bag], list[Bag], list[np.ndarray]]:
    """Train bags, test bags, and per-test-bag instance labels (1 = the target digit)."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    half = len(order) // 2
    pools = (order[:half], order[half:])

    def make(n: int, pool: np.ndarray, offset: int):
        pos_pool, neg_pool = pool[y[pool] == target], pool[y[pool] != target]
        bags, inst = [], []
        for i in range(n):
            size = max(2, int(round(rng.normal(mean_size, std_size))))
            positive = i % 2 == 1
            k = int(rng.integers(1, max(2, size // 3) + 1)) if positive else 0
            idx = np.concatenate([rng.choice(pos_pool, k), rng.choice(neg_pool, size - k)])
            idx = rng.permutation(idx)
            bags.append(Bag(f"bag{offset + i:04d}", torch.from_numpy(X[idx]), int(positive), f"p{offset + i}"))
            inst.append((y[idx] == target).astype(int))
        return bags, inst

    train, _ = make(n_train, pools[0], 0)
    test, test_inst = make(n_test, pools[1], n_train)
    return train, test, test_inst


def instance_scores(model, bag: Bag) -> torch.Tensor:
    """A model's instance scores for one in-memory bag (with its grid cells, if it has them)."""
    cells = bag.cells[None] if bag.cells is not None else None
    return model(bag.features[None], torch.ones(1, len(bag.features), dtype=torch.bool), cells).instance_scores[0]


def evaluate(model, test: list[Bag], instance_labels: list[np.ndarray]) -> tuple[float, float]:
    """(bag AUROC, attention instance AUROC over the positive test bags) of a trained model."""
    from sklearn.metrics import roc_auc_score

    from .train import predict_bags

    probs, _ = predict_bags(model, test)
    bag_auc = float(roc_auc_score([b.label for b in test], probs[:, 1]))
    scores, truth = [], []
    with torch.no_grad():
        for bag, labels in zip(test, instance_labels):
            if bag.label == 1:
                s = instance_scores(model, bag)
                scores += (s[1] if s.dim() == 2 else s).tolist()  # per-class heads: the positive class's map
                truth += labels.tolist()
    return bag_auc, float(roc_auc_score(truth, scores))


def digits_survival_bags(n_train: int = 1200, n_test: int = 500, mean_size: int = 10, std_size: float = 2.0,
                         target: int = 9, beta: float = 1.5, censoring: float = 0.3, max_k: int = 4,
                         seed: int = 0):
    """Digits-bags for survival: a bag's hazard grows with its number k of target digits,
    h = 0.1 exp(beta * k) (k = 0 in 40% of bags, else uniform on 1..max_k), event times exponential with
    that hazard, censoring times exponential with one rate giving about ``censoring`` censored bags.

    Returns (train bags, test bags, per-test-bag instance labels, the test bags' true log hazards); bags
    carry ``time`` and ``event``. Train and test draw from disjoint images.
    """
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    pools = (order[: len(order) // 2], order[len(order) // 2:])
    rate = {"censor": None}

    def make(n: int, pool: np.ndarray, offset: int):
        pos_pool, neg_pool = pool[y[pool] == target], pool[y[pool] != target]
        sizes = np.maximum(5, np.round(rng.normal(mean_size, std_size, n))).astype(int)
        ks = np.where(rng.random(n) < 0.4, 0, rng.integers(1, max_k + 1, n))
        log_h = np.log(0.1) + beta * ks
        if rate["censor"] is None:  # the censoring rate whose expected censored share is ``censoring``
            lo, hi = 1e-6, 100.0
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if np.mean(mid / (mid + np.exp(log_h))) < censoring else (lo, mid)
            rate["censor"] = lo
        t_event, t_censor = rng.exponential(np.exp(-log_h)), rng.exponential(1 / rate["censor"], n)
        bags, inst = [], []
        for i in range(n):
            idx = rng.permutation(np.concatenate([rng.choice(pos_pool, ks[i]), rng.choice(neg_pool, sizes[i] - ks[i])]))
            event = int(t_event[i] <= t_censor[i])
            bags.append(Bag(f"bag{offset + i:04d}", torch.from_numpy(X[idx]), 0, f"p{offset + i}",
                            time=float(min(t_event[i], t_censor[i])), event=event))
            inst.append((y[idx] == target).astype(int))
        return bags, inst, log_h

    train, _, _ = make(n_train, pools[0], 0)
    test, test_inst, test_log_h = make(n_test, pools[1], n_train)
    return train, test, test_inst, test_log_h


def evaluate_survival(model, task, test: list[Bag], instance_labels: list[np.ndarray],
                      log_hazard: np.ndarray) -> dict:
    """Harrell's c-index of the model's risk and of the true log hazard (the oracle) on the same test
    bags (scikit-survival), and the instance AUROC of the attention over the bags holding target digits
    (per-class heads: the mean of their rows, as the heatmap collapses them)."""
    from sklearn.metrics import roc_auc_score
    from sksurv.metrics import concordance_index_censored

    from .train import predict_bags

    outputs, _ = predict_bags(model, test, task=task)
    event = np.array([b.event == 1 for b in test])
    time = np.array([b.time for b in test])
    c = concordance_index_censored(event, time, task.risk(outputs))[0]
    oracle = concordance_index_censored(event, time, log_hazard)[0]
    scores, truth = [], []
    with torch.no_grad():
        for bag, labels in zip(test, instance_labels):
            if labels.any():
                s = instance_scores(model, bag)
                scores += (s.mean(0) if s.dim() == 2 else s).tolist()
                truth += labels.tolist()
    return {"c_index": float(c), "oracle_c_index": float(oracle), "instance_auroc": float(roc_auc_score(truth, scores))}


def spatial_digits_bags(n_train: int = 400, n_test: int = 200, side: int = 7, target: int = 9,
                        seed: int = 0) -> tuple[list[Bag], list[Bag], list[np.ndarray]]:
    """Spatial digits-bags: each bag is a ``side`` x ``side`` grid of digit images carrying its grid cells.
    A bag is positive iff it holds a contiguous block of target digits (2x2, or 2x3 / 3x2). A negative bag
    holds as many target digits, scattered: k isolated ones (no two touching) with k drawn like the block's
    size (4 or 6). Every bag also holds 0 or 1 further isolated target digit, touching nothing. So the
    number of target digits has the same distribution in both classes: only their arrangement tells the
    classes apart. Instance labels (returned for the test bags) mark the block; the isolated target digits
    are 0, so a map that finds the block needs to know where patches are.

    Returns (train bags, test bags, per-test-bag block labels); train and test draw disjoint images."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    pools = (order[: len(order) // 2], order[len(order) // 2:])
    cells = np.array([(c, r) for r in range(side) for c in range(side)])

    def touches(cell, taken) -> bool:
        return any(max(abs(cell[0] - t[0]), abs(cell[1] - t[1])) <= 1 for t in taken)

    def scatter(want: int, taken: set) -> set:
        while True:  # a random greedy placement; redrawn in the rare case it boxes itself in
            isolated: set = set()
            for k in rng.permutation(len(cells)):
                cell = tuple(int(v) for v in cells[k])
                if len(isolated) < want and not touches(cell, taken | isolated):
                    isolated.add(cell)
            if len(isolated) == want:
                return isolated

    def layout(positive: bool) -> tuple[set, set]:
        w, h = [(2, 2), (2, 3), (3, 2)][rng.integers(3)]
        extra = int(rng.integers(0, 2))
        if not positive:
            return set(), scatter(w * h + extra, set())
        c0, r0 = rng.integers(0, side - w + 1), rng.integers(0, side - h + 1)
        block = {(int(c0) + i, int(r0) + j) for i in range(w) for j in range(h)}
        return block, scatter(extra, block)

    def make(n: int, pool: np.ndarray, offset: int):
        pos_pool, neg_pool = pool[y[pool] == target], pool[y[pool] != target]
        bags, inst = [], []
        for i in range(n):
            block, isolated = layout(i % 2 == 1)
            is_target = np.array([tuple(c) in block | isolated for c in cells])
            idx = np.where(is_target, rng.choice(pos_pool, len(cells)), rng.choice(neg_pool, len(cells)))
            bags.append(Bag(f"bag{offset + i:04d}", torch.from_numpy(X[idx]), int(bool(block)), f"p{offset + i}",
                            cells=torch.from_numpy(cells.copy())))
            inst.append(np.array([tuple(c) in block for c in cells], dtype=int))
        return bags, inst

    train, _ = make(n_train, pools[0], 0)
    test, test_inst = make(n_test, pools[1], n_train)
    return train, test, test_inst


def without_positions(bags: list[Bag]) -> list[Bag]:
    """The same bags with their grid cells dropped (a head then sees no neighbours)."""
    from dataclasses import replace

    return [replace(b, cells=None) for b in bags]
