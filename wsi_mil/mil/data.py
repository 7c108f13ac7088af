"""Bags for MIL: labels CSV, bags streamed from their feature files through a byte-bounded LRU cache, and
padded mini-batches.

A :class:`Bag` names its features file (or holds its features, for bags built in memory). Training reads
bags through :class:`BagCache` (``train.cache_gb``; optionally kept in fp16): when the whole cohort fits,
every bag is read once and then served from memory (the old all-in-memory behaviour); when it does
not, the least recently used bags are dropped and read again when needed, so a cohort larger than RAM
trains in bounded memory.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import WsiMilError
from ..formats import bag_size, read_bag, read_bag_cells, read_feature_spec
from ..layout import slide_files
from ..runner.memory import mapped_empty
from ..userfiles import read_csv_rows


@dataclass
class Bag:
    slide_id: str
    features: torch.Tensor | None  # (N, D) held in memory, or None: read from ``path`` on demand
    label: int
    patient_id: str
    split: str | None = None
    path: Path | None = None
    n_instances: int = 0
    time: float | None = None  # survival: follow-up time ...
    event: int | None = None  # ... and 1 (event) / 0 (censored); ``label`` is then the interval
    value: float | None = None  # regression: the numeric target
    values: tuple[int, ...] | None = None  # multi-label: one 0/1 per target
    slides: tuple[str, ...] = ()  # a patient-level bag: its slides ...
    paths: tuple[Path, ...] = ()  # ... and their feature files, read one after the other as one bag
    cells: torch.Tensor | None = None  # (N, 2) grid cells of a bag held in memory (None: none, or read from path)

    @property
    def target(self):
        """What the loss compares with: the class, (interval, time, event) for survival, the value for
        regression, or the 0/1 tuple for multi-label."""
        if self.time is not None:
            return (self.label, self.time, self.event)
        if self.value is not None:
            return float(self.value)
        return self.values if self.values is not None else self.label


@dataclass
class BagSet:
    bags: list[Bag]
    label_map: dict[str, int]
    feature_dim: int
    encoder_id: str
    no_features: list[str]  # labelled slides without a feature file
    no_label: list[str]  # feature files without a label
    no_patches: list[str] = field(default_factory=list)  # labelled, but 0 patches: no bag, no prediction


def read_labels(path: str | Path, split_column: str | None = None, fold_case: bool = False,
                columns: tuple[str, ...] = ("label",)) -> list[dict]:
    """Rows of a labels CSV (slide_id, the task's ``columns``[, patient_id][, split_column]), checked.

    Ids and labels are stripped of surrounding spaces. An empty slide_id or label (a short row too) is an
    error naming its line. Labels that differ only in case (``Tumour``/``tumour``) are an error naming
    them, unless ``fold_case`` (``train.fold_label_case``): then each takes the spelling most rows use.
    Survival columns are checked by :func:`wsi_mil.mil.survival.survival_labels`.
    """
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"train.labels: file not found: {path}")
    rows = read_csv_rows(path, "train.labels")
    if not rows or not {"slide_id", *columns} <= set(rows[0]):
        raise WsiMilError(f"{path.name}: labels CSV needs columns slide_id,{','.join(columns)}")
    if split_column and split_column not in rows[0]:
        raise WsiMilError(f"{path.name}: no column '{split_column}' (train.split_column)")
    seen = set()
    required = ("slide_id", "label") if "label" in columns else ("slide_id",)
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        for key in ("slide_id", "patient_id", *columns):
            if isinstance(r.get(key), str):
                r[key] = r[key].strip()
        missing = next((key for key in required if not r.get(key)), None)
        if missing:
            raise WsiMilError(f"{path.name} line {line}: empty {missing} (row {list(r.values())[:3]}); "
                              f"fill it in or delete the row")
        if r["slide_id"] in seen:
            raise WsiMilError(f"{path.name}: slide_id '{r['slide_id']}' appears twice")
        seen.add(r["slide_id"])
    if "label" in columns:
        _check_label_case(rows, path.name, fold_case)
    return rows


def _check_label_case(rows: list[dict], name: str, fold_case: bool) -> None:
    spellings: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = spellings.setdefault(r["label"].casefold(), {})
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    clashes = {k: v for k, v in spellings.items() if len(v) > 1}
    if not clashes:
        return
    if not fold_case:
        shown = "; ".join(" / ".join(repr(s) for s in v) for v in clashes.values())
        raise WsiMilError(f"{name}: labels differ only in case: {shown}; correct them, or set "
                          f"train.fold_label_case=true to treat them as one class")
    chosen = {k: max(v, key=v.get) for k, v in clashes.items()}  # the most used spelling (first on a tie)
    for r in rows:
        r["label"] = chosen.get(r["label"].casefold(), r["label"])


def make_label_map(values: list[str]) -> dict[str, int]:
    """Sorted unique labels -> 0..C-1 (numerically when every label is an integer)."""
    uniq = sorted(set(values), key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
    if len(uniq) < 2:
        raise WsiMilError(f"need at least two classes to train, found {uniq}")
    return {v: i for i, v in enumerate(uniq)}


def feature_info(path: Path) -> tuple[int, str]:
    """(feature dim, encoder id) of a features file."""
    spec = read_feature_spec(path)
    return spec.feature_dim, spec.encoder_id


def side_by_side(cells: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The grid cells of a patient's slides as one grid: each slide placed right of the one before with
    a gap of one cell, so no patch of one slide neighbours a patch of another (None if any slide has no
    positions)."""
    if any(c is None for c in cells):
        return None
    out, left = [], 0
    for c in cells:
        if len(c):
            c = c - c.min(0).values + torch.tensor([left, 0])
            left = int(c[:, 0].max()) + 2
        out.append(c)
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def load_features(path: Path, dtype: torch.dtype | None = None, alloc=None) -> torch.Tensor:
    """A bag's (N, D) features, converted to ``dtype`` as they are read, into ``alloc(shape, dtype)`` if
    given; NaN or inf anywhere is an error naming the file (never a prediction)."""
    return torch.from_numpy(read_bag(path, dtype=NUMPY_DTYPES[dtype] if dtype is not None else None, alloc=alloc))


def load_mapped(paths: list[Path], dtype: torch.dtype, reserve=None) -> torch.Tensor:
    """The (N, D) features of one or more files (a patient's slides, in order) as one tensor in memory
    mapped for it alone (:func:`~wsi_mil.runner.memory.mapped_empty`): each file is read straight into
    its rows, with no concatenating copy, and evicting the bag gives the memory back to the system.
    ``reserve(nbytes)``, when given, is called with the bag's size before its memory is mapped."""
    def mapped(shape, np_dtype):
        if reserve is not None:
            reserve(int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
        return mapped_empty(shape, np_dtype)

    if len(paths) == 1:
        return load_features(paths[0], dtype, alloc=mapped)
    sizes = [bag_size(p) for p in paths]
    dim = read_feature_spec(paths[0]).feature_dim
    whole = mapped((sum(sizes), dim), NUMPY_DTYPES[dtype])
    start = 0
    for path, n in zip(paths, sizes):
        rows = whole[start:start + n]
        load_features(path, dtype, alloc=lambda shape, _dt, rows=rows, path=path: _checked(rows, shape, path))
        start += n
    return torch.from_numpy(whole)


def _checked(rows: np.ndarray, shape: tuple, path: Path) -> np.ndarray:
    if tuple(shape) != rows.shape:
        raise WsiMilError(f"{Path(path).name}: features of shape {tuple(shape)}, expected {rows.shape}")
    return rows


class BagCache:
    """Bag features by file, least recently used first out, holding at most ``max_bytes``."""

    def __init__(self, max_bytes: float, dtype: torch.dtype = torch.float32):
        self.max_bytes, self.dtype = float(max_bytes), dtype
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cells: dict[str, torch.Tensor] = {}  # small (16 bytes a patch): kept for every bag seen
        self.bytes = 0
        self.reads = 0

    @classmethod
    def from_config(cls, tcfg, share: int = 1) -> BagCache:
        dtype = torch.float16 if tcfg.cache_dtype == "float16" else torch.float32
        return cls(tcfg.cache_gb * 2**30 / max(1, share), dtype)

    def cells(self, bag: Bag) -> torch.Tensor | None:
        """The bag's (N, 2) grid cells (a patient's slides side by side), or None for an in-memory bag
        without positions."""
        if bag.features is not None:
            return bag.cells
        key = _key(bag)
        hit = self._cells.get(key)
        if hit is None:
            paths = bag.paths or (bag.path,)
            hit = side_by_side([bag_cells(p) for p in paths])
            self._cells[key] = hit
        return hit

    def get(self, bag: Bag) -> torch.Tensor:
        if bag.features is not None:
            return bag.features
        key = _key(bag)
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        t = load_mapped(list(bag.paths or (bag.path,)), self.dtype, reserve=self._make_room)
        self.reads += 1
        size = t.numel() * t.element_size()
        if size <= self.max_bytes:
            self._make_room(size)
            self._items[key] = t
            self.bytes += size
        return t

    def _make_room(self, size: int) -> None:
        """Evict least recently used bags until ``size`` more bytes fit, before a new bag is read, so the
        cache and the bag being read never hold more than ``max_bytes`` together (a bag too big to cache
        evicts nothing)."""
        if size > self.max_bytes:
            return
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def bag_cells(path: Path) -> torch.Tensor | None:
    """A features file's (N, 2) grid cells (:func:`wsi_mil.formats.read_bag_cells`), or None."""
    cells = read_bag_cells(path)
    return None if cells is None else torch.from_numpy(cells)


def _key(bag: Bag) -> str:
    return "|".join(map(str, bag.paths)) if bag.paths else str(bag.path)


class BagDataset(torch.utils.data.Dataset):
    """Items ``(index, epoch)`` -> ``(features, target, cells or None)``; an instance subsample (``max_instances``) is drawn
    from a seed of (seed, epoch, index), so it is the same with or without DataLoader workers."""

    def __init__(self, bags: list[Bag], cache: BagCache, max_instances: int | None = None, seed: int = 0):
        self.bags, self.cache, self.max_instances, self.seed = bags, cache, max_instances, seed

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        f, cells = self.cache.get(self.bags[i]), self.cache.cells(self.bags[i])
        if self.max_instances is not None and len(f) > self.max_instances:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 10_007 + i) % 2**63)
            pick = torch.randperm(len(f), generator=g)[: self.max_instances]
            f, cells = f[pick], (cells[pick] if cells is not None else None)
        return f, self.bags[i].target, cells


def pad_batch(items: list[tuple], dtype: torch.dtype = torch.float32):
    """``[(features (N_i, D), target[, cells (N_i, 2) or None]), ...]`` -> x (B, N_max, D), mask (B, N_max),
    y: (B,) class indices, or (B, 3) float (interval, time, event) for survival, ..., and coords
    (B, N_max, 2) long, or None when any bag has no positions.

    One bag (the default, one bag per step) is not padded: x is a view of its features (converted only
    if stored in another dtype), the mask all True, the coords a view of its cells; on a 20,000 x 1024
    bag this saves an 80 MB zeroed allocation and copy each step (issue 23)."""
    if len(items) == 1 and len(items[0][0]):
        return _one(items[0], dtype)
    n_max = max(1, max(len(it[0]) for it in items))
    dim = items[0][0].shape[1]
    x = torch.zeros(len(items), n_max, dim, dtype=dtype)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    cells = [it[2] if len(it) > 2 else None for it in items]
    coords = None if any(c is None for c in cells) else torch.zeros(len(items), n_max, 2, dtype=torch.long)
    for i, it in enumerate(items):
        x[i, :len(it[0])] = it[0]
        mask[i, :len(it[0])] = True
        if coords is not None:
            coords[i, :len(it[0])] = cells[i]
    return x, mask, _targets([it[1] for it in items]), coords


def _one(item: tuple, dtype: torch.dtype):
    feats, target = item[0], item[1]
    cells = item[2] if len(item) > 2 else None
    x = feats.to(dtype).unsqueeze(0)  # a view when already in dtype
    mask = torch.ones(1, len(feats), dtype=torch.bool)
    coords = None if cells is None else cells.to(torch.long).unsqueeze(0)
    return x, mask, _targets([target]), coords


def _targets(targets: list) -> torch.Tensor:
    if isinstance(targets[0], (tuple, float)):  # survival, multi-label, regression
        return torch.tensor(targets, dtype=torch.float32)
    return torch.tensor(targets, dtype=torch.long)


def load_bagset(features_dir: str | Path, labels_csv: str | Path, missing: str = "skip",
                split_column: str | None = None, label_map: dict[str, int] | None = None,
                fold_case: bool = False, columns: tuple[str, ...] = ("label",), parse=None) -> BagSet:
    """Every labelled bag, by file (features are read later, through a :class:`BagCache`). Slides with no
    features and features with no label are listed; with ``missing='error'`` either is an error.
    ``columns`` are the task's label columns; ``parse(rows, csv name)`` (tasks other than classification)
    checks them and gives each row's :class:`Bag` target fields (survival's time and event, ...)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise WsiMilError(f"features folder not found: {features_dir} (run 'wsi-mil extract' or set train.features)")
    rows = read_labels(labels_csv, split_column, fold_case, columns)
    if parse is not None:
        for r, fields in zip(rows, parse(rows, Path(labels_csv).name)):
            r["label"], r["_target"] = "0", fields
        label_map = {"0": 0}
    files = slide_files(features_dir)
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
    bags, empty = [], []
    for r in rows:
        dim, enc = feature_info(files[r["slide_id"]])
        dims.setdefault((dim, enc), []).append(r["slide_id"])
        label = str(r["label"])
        if label not in label_map:
            raise WsiMilError(f"slide {r['slide_id']}: label '{label}' is not one of {sorted(label_map)}")
        path = files[r["slide_id"]]
        n = bag_size(path)
        if n == 0:
            empty.append(r["slide_id"])
            continue
        bags.append(Bag(r["slide_id"], None, label_map[label], r.get("patient_id") or r["slide_id"],
                        r.get(split_column) if split_column else None, path, n, **r.get("_target", {})))
    if len(dims) > 1:
        raise WsiMilError(f"feature files disagree on (dim, encoder): {json.dumps({str(k): v[:3] for k, v in dims.items()})}")
    (dim, enc), = dims
    if len(bags) < 2:
        raise WsiMilError(f"only {len(bags)} labelled slide(s) have patches in {features_dir}; nothing to train")
    return BagSet(bags, label_map, dim, enc, no_features, no_label, empty)


def patient_bags(data: BagSet) -> BagSet:
    """One bag per patient (``train.bag_level=patient``): the patient's slides' patches, read in slide order
    as one bag. Its slides must agree on the target (class, survival time and event, value, ...): a patient
    whose slides disagree is one line naming it."""
    by_patient: dict[str, list[Bag]] = {}
    for bag in data.bags:
        by_patient.setdefault(bag.patient_id, []).append(bag)
    merged = []
    for pid, bags in by_patient.items():
        if len({repr(b.target) for b in bags}) > 1:
            raise WsiMilError(f"patient {pid}: its slides ({', '.join(b.slide_id for b in bags)}) have different "
                              f"labels; a patient-level bag needs one (train.bag_level=patient)")
        first = bags[0]
        merged.append(Bag(pid, None, first.label, pid, first.split, None, sum(b.n_instances for b in bags),
                          first.time, first.event, first.value, first.values,
                          tuple(b.slide_id for b in bags), tuple(b.path for b in bags)))
    if len(merged) < 2:
        raise WsiMilError(f"only {len(merged)} patient(s) have slides with patches; nothing to train")
    return BagSet(merged, data.label_map, data.feature_dim, data.encoder_id, data.no_features, data.no_label,
                  data.no_patches)
