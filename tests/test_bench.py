"""`make bench --quick` is part of `make test`: every section runs end to end on small inputs and prints its
one-run figures, so no section can rot unnoticed. One test per section, so the suite's workers share them.
No timing is asserted (the numbers are the bench's job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.bench import SECTIONS  # noqa: E402

# what each section must print besides its header: its ratios, or the figure it exists for
PRINTS = {
    "tile": ["patches, tissue recall"], "extract": ["b/a =", "ours / naive ="],
    "train": ["a/b =", "pure/ours =", "three/merged =", "peak RSS (wsi-mil, default cache)"], "scale": ["throughput ratio"],
    "heatmap": ["seconds per slide"], "mil": ["accuracy", "AUROC"], "view": ["cold p95"],
    "survival": ["c-index", "oracle"], "formats": ["x the svs"], "spatial": ["bag AUROC"],
    "fits": ["serial/dask ="], "serve": ["5xx: 0 of"],
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_bench_section_runs_in_its_quick_form(name, tmp_path):
    assert name in PRINTS, f"a new bench section '{name}': say here what its smoke run must print"
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", "--quick", "--only", name, "--cache", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (out[-3000:], proc.stderr[-3000:])
    assert f"== {name}:" in out, out[-3000:]
    for figure in PRINTS[name]:
        assert figure in out, (figure, out[-3000:])


def test_an_unknown_section_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", "--only", "tile,nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown section 'nope'"), proc.stderr
