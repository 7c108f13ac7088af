"""Bags for MIL: labels CSV, feature files loaded once into memory, and padded mini-batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import WsiMilError
from ..userfiles import read_csv_rows


@dataclass
class Bag:
    slide_id: str
    features: torch.Tensor  # (N, D), kept in the file's dtype; cast per batch
    label: int
    patient_id: str
    split: str | None = None


@dataclass
class BagSet:
    bags: list[Bag]
    label_map: dict[str, int]
    feature_dim: int
    encoder_id: str
    no_features: list[str]  # labelled slides without a feature file
    no_label: list[str]  # feature files without a label


def read_labels(path: str | Path, split_column: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"train.labels: file not found: {path}")
    rows = read_csv_rows(path, "train.labels")
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise WsiMilError(f"{path.name}: labels CSV needs columns slide_id,label")
    if split_column and split_column not in rows[0]:
        raise WsiMilError(f"{path.name}: no column '{split_column}' (train.split_column)")
    seen = set()
    for r in rows:
        if r["slide_id"] in seen:
            raise WsiMilError(f"{path.name}: slide_id '{r['slide_id']}' appears twice")
        seen.add(r["slide_id"])
    return rows


def make_label_map(values: list[str]) -> dict[str, int]:
    """Sorted unique labels -> 0..C-1 (numerically when every label is an integer)."""
    uniq = sorted(set(values), key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
    if len(uniq) < 2:
        raise WsiMilError(f"need at least two classes to train, found {uniq}")
    return {v: i for i, v in enumerate(uniq)}


def feature_info(path: Path) -> tuple[int, str]:
    with h5py.File(path, "r") as fh:
        ds = fh["features"]
        return int(ds.shape[1]), str(ds.attrs.get("encoder_id", path.parent.name))


def load_features(path: Path) -> torch.Tensor:
    with h5py.File(path, "r") as fh:
        return torch.from_numpy(np.ascontiguousarray(fh["features"][:]))


def load_bagset(features_dir: str | Path, labels_csv: str | Path, missing: str = "skip",
                split_column: str | None = None, label_map: dict[str, int] | None = None) -> BagSet:
    """Read every labelled bag once. Slides with no features and features with no label are listed;
    with ``missing='error'`` either is an error."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise WsiMilError(f"features folder not found: {features_dir} (run 'wsi-mil extract' or set train.features)")
    rows = read_labels(labels_csv, split_column)
    files = {p.stem: p for p in sorted(features_dir.glob("*.h5"))}
    no_features = [r["slide_id"] for r in rows if r["slide_id"] not in files]
    labelled = {r["slide_id"] for r in rows}
    no_label = [sid for sid in files if sid not in labelled]
    if missing == "error" and (no_features or no_label):
        raise WsiMilError(f"{len(no_features)} labelled slide(s) without features ({', '.join(no_features[:5])}); "
                          f"{len(no_label)} feature file(s) without a label ({', '.join(no_label[:5])}); "
                          f"set train.missing=skip to leave them out")
    rows = [r for r in rows if r["slide_id"] in files]
    if not rows:
        raise WsiMilError(f"no labelled slide has features in {features_dir}")
    label_map = label_map or make_label_map([str(r["label"]) for r in rows])
    dims = {}
    bags = []
    for r in rows:
        dim, enc = feature_info(files[r["slide_id"]])
        dims.setdefault((dim, enc), []).append(r["slide_id"])
        label = str(r["label"])
        if label not in label_map:
            raise WsiMilError(f"slide {r['slide_id']}: label '{label}' is not one of {sorted(label_map)}")
        bags.append(Bag(r["slide_id"], load_features(files[r["slide_id"]]), label_map[label],
                        r.get("patient_id") or r["slide_id"], r.get(split_column) if split_column else None))
    if len(dims) > 1:
        raise WsiMilError(f"feature files disagree on (dim, encoder): {json.dumps({str(k): v[:3] for k, v in dims.items()})}")
    (dim, enc), = dims
    return BagSet(bags, label_map, dim, enc, no_features, no_label)


def collate(bags: list[Bag], max_instances: int | None = None, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to (B, N_max, D) with a mask; optionally subsample at most ``max_instances`` per bag."""
    feats = []
    for bag in bags:
        f = bag.features
        if max_instances is not None and len(f) > max_instances:
            f = f[torch.randperm(len(f), generator=generator)[:max_instances]]
        feats.append(f)
    n_max = max(1, max(len(f) for f in feats))
    dim = bags[0].features.shape[1]
    x = torch.empty(len(bags), n_max, dim, dtype=dtype)  # only the padded tails are zeroed
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, :len(f)] = f
        x[i, len(f):] = 0
        mask[i, :len(f)] = True
    y = torch.tensor([b.label for b in bags], dtype=torch.long)
    return x, mask, y
