"""Fit one MIL model: Adam/AdamW, class-weighted loss or balanced sampling, early stopping on validation
loss (patience + minimum epochs) keeping the best weights. Deterministic for a given seed."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from .data import Bag, collate
from .models import create_model


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _order(labels: np.ndarray, balance: str, gen: torch.Generator, n_classes: int) -> torch.Tensor:
    n = len(labels)
    if balance == "sampler":  # draw bags with probability inverse to their class frequency
        w = class_weights(labels, n_classes)[torch.as_tensor(labels)]
        return torch.multinomial(w, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


@torch.no_grad()
def predict_bags(model: nn.Module, bags: list[Bag], batch_size: int = 8, device="cpu") -> tuple[np.ndarray, float]:
    """Class probabilities (n, C) and the mean cross-entropy over the bags (nan for no bags)."""
    model.eval()
    probs, losses = [], []
    for i in range(0, len(bags), batch_size):
        x, mask, y = collate(bags[i:i + batch_size])
        logits, _ = model(x.to(device), mask.to(device))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        losses.append(nn.functional.cross_entropy(logits.float(), y.to(device), reduction="sum").item())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 0))
    return p, (sum(losses) / len(bags)) if losses and len(bags) else math.nan


def fit(train: list[Bag], val: list[Bag], in_dim: int, n_classes: int, mcfg: ModelConfig, tcfg: TrainConfig,
        seed: int, device="cpu", progress: bool = False) -> FitResult:
    gen = seed_everything(seed)
    model = create_model(mcfg.name, in_dim, n_classes, mcfg.hidden_dim, mcfg.attention_dim, mcfg.dropout).to(device)
    opt_cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    labels = np.array([b.label for b in train])
    weight = class_weights(labels, n_classes).to(device) if tcfg.balance == "weighted_loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history = []
    stale = 0
    epochs = tqdm(range(1, tcfg.epochs + 1), desc="epochs", leave=False, disable=not progress)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        order = _order(labels, tcfg.balance, gen, n_classes)
        total, seen = 0.0, 0
        for i in range(0, len(order), tcfg.batch_size):
            batch = [train[j] for j in order[i:i + tcfg.batch_size].tolist()]
            x, mask, y = collate(batch, tcfg.max_instances, gen)
            logits, _ = model(x.to(device), mask.to(device))
            loss = loss_fn(logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "seconds": time.perf_counter() - t0}
        if val:
            _, row["val_loss"] = predict_bags(model, val, device=device)
        history.append(row)
        monitor = row.get("val_loss", row["train_loss"]) if val else -epoch  # no val: keep the last epoch
        if monitor < best[0] - 1e-6:
            best, stale = (monitor, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            stale += 1
        epochs.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_loss', math.nan):.3f}")
        if epoch >= tcfg.min_epochs and stale >= tcfg.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, best[1], history)
