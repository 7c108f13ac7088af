"""Comparing output trees: HDF5 by content (datasets and attrs), everything else byte for byte; finding a
process's spawned workers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from wsi_mil.atomic import TMP_TAG

IGNORED = {"manifest.csv"}


def _h5_content(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as fh:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            out[name + "@attrs"] = {k: v for k, v in obj.attrs.items()}
        fh.visititems(visit)
        out["@root"] = dict(fh.attrs)
    return out


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")
    return a == b


def output_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.name not in IGNORED}


def assert_same_outputs(a: Path, b: Path) -> None:
    fa, fb = output_files(a), output_files(b)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
    for rel in fa:
        if rel.endswith(".h5"):
            assert _equal(_h5_content(fa[rel]), _h5_content(fb[rel])), rel
        else:
            assert fa[rel].read_bytes() == fb[rel].read_bytes(), rel


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_TAG in p.name]


def spawned_workers(pid: int) -> list:
    """The multiprocessing ``spawn`` children of process ``pid`` (psutil processes), not its resource
    tracker."""
    import psutil

    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
