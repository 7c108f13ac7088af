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


@pytest.mark.parametrize("name", sorted(set(SECTIONS) - {"mil"}))  # mil: its resume test below runs it
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


def test_the_mil_section_goes_on_from_the_fold_results_a_killed_run_left(tmp_path):
    """A 1-hour head killed at fold 25 of 30 must not start over: each fold's result is kept in CACHE/mil as
    it ends. Run twice on one cache: the second run trains nothing and prints the same table; an unreadable
    result file is run again. (The first run is the mil section's smoke run: every head, 2 folds.)"""
    def bench():
        proc = subprocess.run([sys.executable, "-m", "pipelines.bench", "--quick", "--only", "mil", "--cache",
                               str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.stdout

    first = bench()
    if "not found; skipped" in first:
        pytest.skip("../shared/mil_benchmarks is absent")
    assert "== mil:" in first and all(figure in first for figure in PRINTS["mil"]), first[-3000:]
    from wsi_mil.mil.models import MODELS

    files = sorted((tmp_path / "mil").glob("*.json"))
    assert len(files) == 2 * len(MODELS) and "reused" not in first  # 2 folds of each head
    second = bench()
    assert f"{len(files)} of {len(files)} fold results reused" in second
    assert second.split("| model |")[1] == first.split("| model |")[1]  # the same table
    files[0].write_text('{"data": "ucsb')  # a result cut short
    assert f"{len(files) - 1} of {len(files)} fold results reused" in bench()


def test_a_mil_fold_result_is_keyed_by_everything_that_decides_it(tmp_path):
    from pipelines.bench.mil import _result_files

    data = tmp_path / "d.csv.gz"
    data.write_bytes(b"1,0,0.5\n")
    job = (str(data), "abmil", 0, 1, 10, ("train.epochs=20",), "ilse2018")
    variants = [job, (*job[:5], ("train.epochs=20", "train.lr=0.001"), job[6]), (*job[:1], "meanpool", *job[2:]),
                (*job[:2], 1, *job[3:]), (*job[:3], 2, *job[4:]), (*job[:4], 5, *job[5:]), (*job[:6], "default")]
    names = {_result_files(tmp_path, [v])[v].name for v in variants}
    assert len(names) == len(variants)
    before = _result_files(tmp_path, [job])[job]
    data.write_bytes(b"1,0,0.6\n")  # the same file name, other data
    assert _result_files(tmp_path, [job])[job] != before
