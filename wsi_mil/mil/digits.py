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
                out = model(bag.features[None], torch.ones(1, len(bag.features), dtype=torch.bool))
                s = out.instance_scores[0]
                scores += (s[1] if s.dim() == 2 else s).tolist()  # per-class heads: the positive class's map
                truth += labels.tolist()
    return bag_auc, float(roc_auc_score(truth, scores))
