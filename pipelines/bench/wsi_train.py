"""train at WSI scale (issue 23): 40 bags of 20,000 x 1024 float32 features (3.2 GB), clam_sb at CLAM's small
size, the 16 training bags of fold 0 of ``wsi-mil train train.folds=2``.

Printed, each from one run: our epoch vs the pure forward + backward + Adam step of the same module on the
same tensors (fp32, and the default ``train.amp``, bf16 where the CPU has it natively); with ``--clam
CLAM_DIR``, CLAM's own ``main.py``, unchanged, on the same bags and the same split, its ``train_loop_clam``
timed from outside; and each process's peak RSS, with our default bag cache (the cohort in memory) and
with ``train.cache_gb=0`` (every bag read each step, as CLAM does).

Our side runs in a child process (:func:`child`) so its peak RSS is its
own; CLAM's runs in another, from a working folder laid out as its ``main.py`` expects (dataset_csv/,
splits/, pt_files/). CLAM is never vendored: the user points at a checkout (and puts smooth-topk on
PYTHONPATH for its SVM instance loss; without it both sides use cross-entropy, and the line says so).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from .common import PEAK_PROBE, pure_pass

HEAD = ["model.name=clam_sb", "model.hidden_dim=512", "model.attention_dim=256", "model.dropout=0.25",
        "model.kwargs.k_sample=8", "model.kwargs.bag_weight=0.7", "train.optimizer=adam", "train.lr=2e-4",
        "train.weight_decay=1e-5", "train.balance=none", "train.folds=2", "train.seed=0"]


def _run_child(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[dict, float]:
    """A child's ``RESULT {json}`` line and its peak RSS in GB (its own ``PEAK_KB`` line, VmHWM of
    itself); a failure is a RuntimeError with the tail of its stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    peak = next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_KB "))
    return _result(proc.stdout), int(peak.split()[1]) / 2**20


def _result(out: str) -> dict:
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ours(folder: Path, epochs: int, rounds: int, inst_loss: str, extra: list[str],
          pure: bool = True) -> tuple[dict, float]:
    """Our side in a child process; without ``pure`` no pure-step pass (whose tensors, all held at once,
    would count in the peak RSS of a run that streams its bags)."""
    cmd = [sys.executable, "-c", "import sys; from pipelines.bench.wsi_train import child; child(sys.argv[1:])",
           str(folder), str(epochs), str(rounds), inst_loss, str(int(pure)), *extra]
    return _run_child(cmd, cwd=Path(__file__).resolve().parents[2])


def run(opts) -> None:
    from .scale import _synthetic_cohort

    n_bags, n_inst, dim, epochs = (20, 200, 1024, 2) if opts.quick else (40, 20000, 1024, 3)
    folder = opts.cache / f"wsi_{n_bags}x{n_inst}x{dim}"
    print(f"\n== train at WSI scale: {n_bags} bags x {n_inst} x {dim} float32 "
          f"({n_bags * n_inst * dim * 4 / 2**30:.1f} GB), clam_sb (512/256, dropout 0.25, k_sample 8), Adam 2e-4, "
          f"fold 0 of train.folds=2, {epochs} epochs, the first not timed", flush=True)
    _synthetic_cohort(folder, n_bags, n_inst, dim)
    clam = Path(opts.clam).resolve() if opts.clam else None
    inst_loss = "svm" if clam is None or _has_topk(clam) else "ce"
    ours, peak = _ours(folder, epochs, 1 if opts.quick else 3, inst_loss, [])
    _print_ours(ours, peak, inst_loss)
    for workers in (0,) if opts.quick else (0, 1):  # read-ahead by a worker: does it pay when every bag is read each step?
        streamed, peak0 = _ours(folder, epochs, 1, inst_loss, ["train.cache_gb=0", "train.amp=false",
                                                               f"train.num_workers={workers}"], pure=False)
        print(f"  train.cache_gb=0 (each bag read from disk every step, as CLAM does), fp32, train.num_workers="
              f"{workers}: epoch {statistics.median(streamed['fp32']['epochs']):.2f} s, peak RSS {peak0:.2f} GB")
    if clam is None:
        print("  CLAM: not measured (pass --clam CLAM_CHECKOUT to time its own main.py on these bags; no ratio is "
              "claimed without it)")
        return
    clam_epochs, clam_peak = _clam(clam, folder, ours["split"], epochs, inst_loss, opts.cache)
    c = statistics.median(clam_epochs[1:])
    print(f"  CLAM main.py, train_loop_clam: epochs {_fmt(clam_epochs)} s, median {c:.2f} s, peak RSS "
          f"{clam_peak:.2f} GB")
    for name, row in ours.items():
        if name != "split":
            print(f"  CLAM / wsi-mil ({name}) = {c / statistics.median(row['epochs']):.2f}")


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def _print_ours(ours: dict, peak: float, inst_loss: str) -> None:
    print(f"  instance loss {inst_loss}; {len(ours['split']['train'])} training bags a epoch")
    for name, row in ours.items():
        if name == "split":
            continue
        e, p = statistics.median(row["epochs"]), statistics.median(row["pure"])
        print(f"  {name:5s}: wsi-mil epoch {e:.2f} s (first, cache cold {row['first']:.2f} s; epochs "
              f"{_fmt(row['epochs'])}), pure step {p:.2f} s ({p / len(ours['split']['train']) * 1000:.0f} ms a bag; "
              f"{_fmt(row['pure'])}): pure/ours = {p / e:.3f}")
    print(f"  peak RSS (wsi-mil, default cache): {peak:.2f} GB")


CLAM_TIMER = """
import json, runpy, sys, time
sys.path.insert(0, {clam!r})
sys.argv = [{main!r}, *{args!r}]
import utils.core_utils as core  # CLAM's own module; its train() calls train_loop_clam through these globals
inner, seconds = core.train_loop_clam, []
def timed(*a, **k):
    t0 = time.perf_counter()
    inner(*a, **k)
    seconds.append(time.perf_counter() - t0)
core.train_loop_clam = timed
runpy.run_path({main!r}, run_name="__main__")
print("RESULT " + json.dumps(seconds))
"""


def _clam(clam: Path, folder: Path, split: dict, epochs: int, inst_loss: str, cache: Path) -> tuple[list, float]:
    """CLAM's main.py, unchanged, on our bags (as its .pt files) and our fold-0 split; its
    train_loop_clam's seconds per epoch and its peak RSS."""
    work = _clam_workdir(folder, split, cache)
    args = ["--data_root_dir", str(work / "data"), "--task", "task_1_tumor_vs_normal", "--split_dir", "wsi_bench",
            "--k", "1", "--max_epochs", str(2 * epochs - 1), "--lr", "2e-4", "--reg", "1e-5", "--drop_out", "0.25",
            "--model_type", "clam_sb", "--model_size", "small", "--inst_loss", inst_loss, "--B", "8",
            "--bag_weight", "0.7", "--exp_code", "bench", "--results_dir", str(work / "results"), "--embed_dim",
            str(_dim(folder))]
    code = CLAM_TIMER.format(clam=str(clam), main=str(clam / "main.py"), args=args) + PEAK_PROBE
    return _run_child([sys.executable, "-c", code], cwd=work)


def _dim(folder: Path) -> int:
    from wsi_mil.formats import read_feature_spec

    return read_feature_spec(next((folder / "feats").glob("*.h5"))).feature_dim


def _clam_workdir(folder: Path, split: dict, cache: Path) -> Path:
    """The layout CLAM's main.py reads for task_1_tumor_vs_normal: dataset_csv/, splits/wsi_bench/splits_0.csv
    and data/tumor_vs_normal_resnet_features/pt_files/<slide>.pt (written once, cached)."""
    import csv
    import itertools

    import torch

    from wsi_mil.formats import read_bag

    work = (cache / f"clam_{folder.name}").resolve()
    pt = work / "data" / "tumor_vs_normal_resnet_features" / "pt_files"
    pt.mkdir(parents=True, exist_ok=True)
    names = {"0": "normal_tissue", "1": "tumor_tissue"}
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        target = pt / f"{r['slide_id']}.pt"
        if not target.exists():
            torch.save(torch.from_numpy(read_bag(folder / "feats" / f"{r['slide_id']}.h5")), target.with_suffix(".tmp"))
            target.with_suffix(".tmp").rename(target)
    (work / "dataset_csv").mkdir(exist_ok=True)
    with open(work / "dataset_csv" / "tumor_vs_normal_dummy_clean.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "slide_id", "label"])
        w.writerows([r["slide_id"], r["slide_id"], names[r["label"]]] for r in rows)
    (work / "splits" / "wsi_bench").mkdir(parents=True, exist_ok=True)
    with open(work / "splits" / "wsi_bench" / "splits_0.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "train", "val", "test"])
        cols = itertools.zip_longest(split["train"], split["val"], split["test"], fillvalue="")
        w.writerows([i, *c] for i, c in enumerate(cols))
    return work


def _has_topk(clam: Path) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import topk.svm"], cwd=clam, capture_output=True)
    return probe.returncode == 0


# ---- the child processes -------------------------------------------------------------------------------


def ours_child(folder: Path, epochs: int, rounds: int, inst_loss: str, pure: bool, extra: list[str]) -> dict:
    """Fold 0 fitted as ``wsi-mil train`` fits it (:func:`wsi_mil.mil.folds.fit_fold`), then a pure epoch
    of the same module over the same cached tensors, interleaved ``rounds`` times, in fp32 and (where it
    differs) under ``train.amp``."""
    from wsi_mil.config import load_config
    from wsi_mil.device import native_bf16
    from wsi_mil.mil.data import load_bagset
    from wsi_mil.mil.folds import FoldSpec, fit_fold, worker_cache
    from wsi_mil.stages.train import cv_splits

    base = [*HEAD, f"model.kwargs.instance_loss={inst_loss}", f"train.features={folder / 'feats'}",
            f"train.labels={folder / 'labels.csv'}", f"train.epochs={epochs}", f"train.min_epochs={epochs}", *extra]
    amps = [False] if "train.amp=false" in extra or not native_bf16() else [False, True]
    result: dict = {}
    for _ in range(rounds):
        for amp in amps:
            cfg = load_config(None, [*base, f"train.amp={str(amp).lower()}"])
            data = load_bagset(cfg.train.features, cfg.train.labels)
            split = cv_splits(data, cfg)[0]
            fitted = fit_fold(FoldSpec(data, cfg, 0, split, token="wsi-bench"))
            row = result.setdefault("bf16" if amp else "fp32", {"epochs": [], "pure": [], "first": None})
            seconds = [h["seconds"] for h in fitted.history]
            row["first"] = seconds[0] if row["first"] is None else row["first"]
            row["epochs"] += seconds[1:]
            bags = [data.bags[i] for i in split[0]]
            if pure:
                row["pure"].append(_pure_epoch(cfg, bags, worker_cache("wsi-bench", cfg), data.feature_dim))
            result["split"] = {k: [data.bags[i].slide_id for i in idx] for k, idx in zip(("train", "val", "test"), split)}
    return result


def _pure_epoch(cfg, bags, cache, dim: int) -> float:
    """The pure pass (:func:`.common.pure_pass`) of a fresh module of the same head over the same cached
    tensors, after a warm-up pass."""
    import torch

    from wsi_mil.mil.data import pad_batch
    from wsi_mil.mil.models import build_model
    from wsi_mil.mil.train import make_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.model, dim, 2)
    opt = make_optimizer(model, cfg.train)  # fit's optimizer
    batches = [pad_batch([(cache.get(b), b.label)]) for b in bags]
    pure_pass(model, opt, batches, cfg.train.amp)
    return pure_pass(model, opt, batches, cfg.train.amp)


def child(argv: list[str]) -> None:
    """The child process's entry: FOLDER EPOCHS ROUNDS INSTANCE_LOSS PURE(0/1) [KEY=VALUE ...]."""
    folder, epochs, rounds, inst_loss, pure, *extra = argv
    print("RESULT " + json.dumps(ours_child(Path(folder), int(epochs), int(rounds), inst_loss, pure == "1", extra)))
    exec(PEAK_PROBE)
