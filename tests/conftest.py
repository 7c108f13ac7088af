from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one xdist worker per core: one torch thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # in this process and the CLIs it starts, so none oversubscribes
    import torch

    torch.set_num_threads(1)

import numpy as np
import pytest

from wsi_mil.cli import main
from wsi_mil.synthetic import SyntheticSpec, make_cohort, write_slide

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "slides"
CMU = REAL / "cmu-1-small-region.svs"
BROKEN = REAL / "broken.svs"

SMALL_ENCODER = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0",
                 "extract.batch_size=16"]
needs_real = pytest.mark.skipif(not CMU.is_file(), reason="../shared/slides is not present")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Six small synthetic slides (3 tumour, 3 normal; one with pen, one with debris) + truth + labels."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=6, width=3072, height=2560)


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    made: dict = {}

    def make(name: str, **kw) -> Path:
        if name not in made:
            path = root / f"{name}.svs"
            write_slide(path, SyntheticSpec(**kw), root / "truth")
            made[name] = path
        return made[name]

    make.truth = root / "truth"
    return make


@pytest.fixture(scope="session")
def slide_folder(tmp_path_factory):
    """``slide_folder(name, n, seed0, **spec)``: a folder of ``n`` synthetic slides ``<name><i>.svs``."""

    def make(name: str, n: int, seed0: int, **spec) -> Path:
        root = tmp_path_factory.mktemp(name)
        for i in range(n):
            write_slide(root / f"{name}{i}.svs", SyntheticSpec(seed=seed0 + i, **spec))
        return root

    return make


@pytest.fixture(scope="session")
def mapped(tmp_path_factory):
    """Three synthetic slides (one glass only), tiled and extracted with a small encoder."""
    root = tmp_path_factory.mktemp("mapped")
    slides = root / "slides"
    slides.mkdir()
    for i in range(2):
        write_slide(slides / f"m{i}.svs", SyntheticSpec(width=2048, height=1792, mpp=0.5, seed=90 + i, tumour=i == 1))
    write_slide(slides / "glass.svs", SyntheticSpec(width=1024, height=1024, mpp=0.5, blank=True))
    out = root / "out"
    for stage in ("tile", "extract"):
        assert main([stage, "--slides", str(slides), "--out", str(out), "--no-progress", *SMALL_ENCODER]) == 0
    return slides, out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))
