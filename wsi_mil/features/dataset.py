"""Patches read straight from the slide, for a DataLoader.

Each worker process opens its own slide handle (never shared across processes). Patches are read at the
level chosen during tiling and resized to the encoder's input size; they stay uint8 (normalisation
happens on the device). Neighbouring patches in a row can be read with one region read (``group``).
A tile that fails to decode is retried once with a reopened handle; if that fails too, a white patch
stands in and the item is flagged, so one bad tile never fails the slide.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import SourceUnavailable
from ..formats import PatchSpec
from ..slide.reader import SlideReader
from .encoders.registry import Transform

log = logging.getLogger(__name__)


_PIL = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def official_geometry(patch: np.ndarray, t: Transform) -> np.ndarray:
    """What an encoder's official eval transform does to a tile before ``ToTensor``: torchvision's
    ``Resize(t.resize)`` on a PIL image (the shorter side to ``t.resize``, PIL's antialiased filter) and
    ``CenterCrop(t.crop)`` (offsets ``round((size - crop) / 2)``)."""
    h, w = patch.shape[:2]
    if min(h, w) != t.resize:
        size = (t.resize, int(t.resize * h / w)) if w <= h else (int(t.resize * w / h), t.resize)  # (w, h)
        patch = np.asarray(Image.fromarray(patch).resize(size, _PIL[t.interpolation]))
        h, w = patch.shape[:2]
    top, left = int(round((h - t.crop) / 2.0)), int(round((w - t.crop) / 2.0))
    return np.ascontiguousarray(patch[top:top + t.crop, left:left + t.crop])


class PatchDataset(Dataset):
    def __init__(self, slide_path, backend: str, coords: np.ndarray, level: int, size_at_level: int,
                 size0: int, out_size: int | Transform, group: int = 1):
        self.slide_path = str(slide_path)
        self.backend = backend
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self.level = level
        self.size_at_level = size_at_level
        self.size0 = size0
        self.transform = out_size if isinstance(out_size, Transform) else None
        self.out_size = out_size.crop if isinstance(out_size, Transform) else int(out_size)
        self.group = max(1, group)
        self._reader: SlideReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    # -- handles ----------------------------------------------------------------------------------
    def reader(self) -> SlideReader:
        import os

        if self._reader is None or self._pid != os.getpid():  # one handle per process
            self._reader = SlideReader(self.slide_path, self.backend)
            self._pid = os.getpid()
        return self._reader

    def _reopen(self) -> None:
        try:
            if self._reader is not None:
                self._reader.close()
        except Exception:
            pass
        self._reader = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # handles never travel to worker processes
        return state

    # -- reading ----------------------------------------------------------------------------------
    def _resize(self, patch: np.ndarray) -> np.ndarray:
        if self.transform is not None:
            return official_geometry(patch, self.transform)
        if patch.shape[0] == self.out_size and patch.shape[1] == self.out_size:
            return patch
        interp = cv2.INTER_AREA if patch.shape[0] > self.out_size else cv2.INTER_LINEAR
        return cv2.resize(patch, (self.out_size, self.out_size), interpolation=interp)

    def _read_run(self, idx: list[int]) -> list[np.ndarray]:
        """Read consecutive patches of one row with a single region read, then slice."""
        x0, y0 = self.coords[idx[0]]
        ds = self.size0 / self.size_at_level
        width = int(round((self.coords[idx[-1], 0] - x0) / ds)) + self.size_at_level
        strip = self.reader().read_region((int(x0), int(y0)), self.level, (width, self.size_at_level))
        out = []
        for i in idx:
            off = int(round((self.coords[i, 0] - x0) / ds))
            out.append(self._resize(strip[:, off:off + self.size_at_level]))
        return out

    def _read_safely(self, idx: list[int]) -> tuple[list[np.ndarray], list[bool]]:
        for attempt in (0, 1):
            self.reader()  # a slide that cannot be (re)opened fails the slide: never blank patches for it
            try:
                return self._read_run(idx), [False] * len(idx)
            except SourceUnavailable:
                raise  # a server that went away fails the slide; blanks would pass for its tissue
            except Exception as exc:
                log.debug("read failed (attempt %d) at %s: %s", attempt, self.coords[idx[0]], exc)
                self._reopen()
        if len(idx) > 1:  # find the bad patch(es) one by one
            patches, bad = [], []
            for i in idx:
                p, b = self._read_safely([i])
                patches += p
                bad += b
            return patches, bad
        blank = np.full((self.out_size, self.out_size, 3), 255, np.uint8)
        return [blank], [True]

    def _runs(self, indices: list[int]) -> list[list[int]]:
        """Split indices into runs of horizontal neighbours (same y, touching or overlapping in x)."""
        runs: list[list[int]] = []
        for i in indices:
            if (runs and self.group > 1 and len(runs[-1]) < self.group
                    and self.coords[i, 1] == self.coords[runs[-1][-1], 1]
                    and 0 < self.coords[i, 0] - self.coords[runs[-1][-1], 0] <= self.size0 + 1):
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def __getitems__(self, indices: list[int]):
        images, bad = [], []
        for run in self._runs(list(indices)):
            p, b = self._read_safely(run)
            images += p
            bad += b
        return {"image": torch.from_numpy(np.stack(images)), "index": torch.as_tensor(indices),
                "bad": torch.as_tensor(bad)}

    def __getitem__(self, i: int):
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def collate_batch(batch):
    """``__getitems__`` already returns a batch; this keeps the DataLoader from collating it again."""
    return batch


def patch_dataset(slide_path, coords: np.ndarray, spec: PatchSpec, input_size: int | Transform,
                  group: int = 1) -> PatchDataset:
    """Patches exactly as tiling laid them out (a patch file's :class:`PatchSpec`): its level and read size,
    then the encoder's official geometry (a :class:`Transform`) or, for a plain size, resized to it."""
    return PatchDataset(slide_path, spec.backend or "auto", coords, spec.patch_level, spec.patch_size_level,
                        spec.patch_size_level0, input_size, group)
