"""`make bench --quick` is part of `make test`: every section runs end to end on small inputs and prints its
one-run ratios, so no section can rot unnoticed. No timing is asserted (the numbers are the bench's job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bench_section_runs_in_its_quick_form(tmp_path):
    sys.path.insert(0, str(ROOT))
    from pipelines.bench import SECTIONS

    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", "--quick", "--cache", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (out[-3000:], proc.stderr[-3000:])
    for name in SECTIONS:
        assert f"== {name}:" in out, name
    for ratio in ("b/a =", "ours / naive =", "a/b =", "throughput ratio", "seconds per slide", "cold p95",
                  "serial/dask =", "5xx: 0 of", "pure/ours =", "peak RSS (wsi-mil, default cache)"):
        assert ratio in out, ratio


def test_an_unknown_section_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", "--only", "tile,nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown section 'nope'"), proc.stderr
