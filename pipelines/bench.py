"""`make bench`: throughput figures, measured inside this process (no interpreter start-up).

Sections (``--only tile,extract,train,scale,heatmap,mil,view``); each prints its figures and ratios taken in one run.
Large synthetic inputs are generated once and cached under ``--cache`` (default ``.bench/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

SECTIONS = ["tile", "extract", "train", "scale", "heatmap", "mil", "view"]
OPTIONS = argparse.Namespace(encoder="resnet50_trunc", batch=32, mil_dir="../shared/mil_benchmarks", mil_models="",
                             mil_data="", mil_folds=10, mil_epochs=20, mil_batch=1, mil_repeats=1,
                             mil_recipe="ilse2018", mil_set=[], clam="")  # set by main()


def timed(fn, repeat: int = 3):
    """Median wall seconds of ``repeat`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def big_slide(cache: Path, width: int, height: int, mpp: float) -> Path:  # the heatmap section's slide
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / f"big_{width}x{height}_{mpp}.svs"
    if not path.exists():
        print(f"  generating {path.name} once (cached for later runs) ...", flush=True)
        t0 = time.perf_counter()
        write_slide(path, SyntheticSpec(width=width, height=height, mpp=mpp, tumour=True, seed=7), cache / "truth")
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


PYRAMIDS = {  # name: (level_factor, min_level_size) for write_slide: which levels the file carries
    "aperio 1/4/16/64": (4, 1000),
    "levels 1/4/16": (4, 2000),
    "factor-2": (2, 512),
}


def pyramid_slide(cache: Path, name: str, width: int, height: int) -> Path:
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    factor, min_size = PYRAMIDS[name]
    path = cache / f"pyr_{factor}_{min_size}_{width}x{height}.svs"
    if not path.exists():
        print(f"  generating {path.name} once (cached for later runs) ...", flush=True)
        write_slide(path, SyntheticSpec(width=width, height=height, mpp=0.25, tumour=True, seed=7,
                                        level_factor=factor, min_level_size=min_size), cache / "truth")
    return path


def bench_tile(cache: Path, quick: bool) -> None:
    import cv2

    from wsi_mil.config import load_config
    from wsi_mil.layout import Layout
    from wsi_mil.slide import SlideReader, SlideRef
    from wsi_mil.stages import tile
    from wsi_mil.stages.base import run_stage
    from wsi_mil.synthetic import load_truth

    w, h = (20000, 16000) if quick else (100_000, 80_000)
    print(f"\n== tile: the full tile stage (open, mask, grid, every output written) on one synthetic {w}x{h} "
          f"JPEG slide at 0.25 µm/px, 256-px patches at 0.5 µm/px; seconds beyond interpreter start-up")
    cfg = load_config(None, ["runner.overwrite=true"])
    for name in PYRAMIDS:
        path = pyramid_slide(cache, name, w, h)
        with SlideReader(path) as r:
            levels = "/".join(f"{d:g}" for d in r.level_downsamples)
        layout = Layout(cache / "tile_out" / path.stem)
        ref = SlideRef(path.stem, path)
        seconds, _ = timed(lambda ref=ref, layout=layout: run_stage(tile.STAGE, [ref], cfg, layout, progress=False))
        import h5py

        with h5py.File(layout.patches(path.stem)) as fh:
            mask = fh["tissue_mask"][:] > 0
            n = len(fh["coords"])
        truth, _ = load_truth(cache / "truth", path.stem, "tissue")
        mask = cv2.resize(mask.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        recall = (mask & truth).sum() / max(1, truth.sum())
        precision = (mask & truth).sum() / max(1, mask.sum())
        print(f"  {name:18s} (downsamples {levels}): {seconds:.3f} s (median of 3), {n:,} patches, "
              f"tissue recall {recall:.3f}, precision {precision:.3f}", flush=True)
    # the command itself, in fresh processes: wall time minus an interpreter that only imports what it imports

    path = pyramid_slide(cache, "aperio 1/4/16/64", w, h)
    listing = cache / "tile_cli_slides.csv"
    listing.write_text(f"path\n{path.resolve()}\n")
    cli = [sys.executable, "-m", "wsi_mil.cli", "tile", "--slides", str(listing), "--out",
           str(cache / "tile_out" / "cli"), "--overwrite", "--no-progress"]
    imports = [sys.executable, "-c", "import wsi_mil.cli, wsi_mil.stages.tile, wsi_mil.stages.base"]

    whole = statistics.median(wall_in(cli, Path.cwd()) for _ in range(5))
    start = statistics.median(wall_in(imports, Path.cwd()) for _ in range(5))
    ours = whole - start
    print(f"  as a command, aperio: `wsi-mil tile` {whole:.3f} s, interpreter + imports alone {start:.3f} s: "
          f"{ours:.3f} s beyond start-up (a cold process: libraries the stage imports lazily, first "
          f"allocations; medians of 5)")
    clam = _clam_tiler(cache, path)
    if clam is None:  # a figure from another machine and slide is a reference, never divided into a ratio
        print("  reference (not measured here; pass --clam CLAM_CHECKOUT to time it): ~4.5 s was reported for "
              "CLAM's create_patches_fp.py on a slide of this size; no ratio is claimed")
    else:
        print(f"  CLAM create_patches_fp.py --seg --patch --stitch, same slide, same grid (512 px at level 0), "
              f"same run: {clam:.3f} s beyond its start-up: ratio CLAM / wsi-mil {clam / ours:.1f}x")


def _clam_tiler(cache: Path, slide: Path) -> float | None:
    """CLAM's tiler on ``slide`` as a command, seconds beyond its own interpreter + imports (median of 3), or
    None when no runnable CLAM checkout was given. Never vendored: the user points at their own checkout."""
    import shutil
    import subprocess

    if not OPTIONS.clam:
        return None
    root = Path(OPTIONS.clam).resolve()
    imports = [sys.executable, "-c", "import wsi_core.WholeSlideImage, wsi_core.wsi_utils, "
               "wsi_core.batch_process_utils, pandas"]
    if not (root / "create_patches_fp.py").is_file() or subprocess.run(imports, cwd=root, capture_output=True).returncode:
        print(f"  CLAM: {root} is not a runnable checkout here (create_patches_fp.py and its imports, e.g. "
              f"pandas); not timed")
        return None
    src, out = (cache / "clam_src").resolve(), (cache / "clam_out").resolve()
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / slide.name).symlink_to(slide.resolve())
    cmd = [sys.executable, "create_patches_fp.py", "--source", str(src), "--save_dir", str(out), "--patch_size",
           "512", "--step_size", "512", "--seg", "--patch", "--stitch"]

    def run_clam():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0

    whole = statistics.median(run_clam() for _ in range(3))
    start = statistics.median(wall_in(imports, root) for _ in range(3))
    return whole - start


def wall_in(cmd: list[str], cwd: Path) -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _bench_patches(cache: Path, n: int):
    """A cached synthetic slide, tiled, and the first ``n`` patch coordinates."""
    from wsi_mil.config import load_config
    from wsi_mil.h5io import read_coords
    from wsi_mil.layout import Layout
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import tile_slide
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / "extract_8192x6144_0.5.svs"
    if not path.exists():
        write_slide(path, SyntheticSpec(width=8192, height=6144, mpp=0.5, tumour=True, seed=9))
    layout = Layout(cache / "extract_out")
    patches = layout.patches(path.stem)
    if not patches.exists():
        tile_slide(SlideRef(path.stem, path), load_config(), layout)
    coords, attrs = read_coords(patches)
    return path, coords[:n], attrs


def naive_extract(path: Path, coords, attrs, model, batch: int) -> float:
    """The common baseline: one read_region per patch, PIL + torchvision transforms, batch forward."""
    import openslide
    import torch
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    size = int(attrs["patch_size_level"])
    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as slide, torch.inference_mode():
        for i in range(0, len(coords), batch):
            imgs = [tf(slide.read_region(tuple(int(v) for v in c), int(attrs["patch_level"]), (size, size))
                       .convert("RGB")) for c in coords[i:i + batch]]
            model(torch.stack(imgs))
    return len(coords) / (time.perf_counter() - t0)


def bench_extract(cache: Path, quick: bool) -> None:
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.features.dataset import patch_dataset
    from wsi_mil.features.engine import extract_patches, prepared_encoder

    n = 64 if quick else 256
    path, coords, attrs = _bench_patches(cache, n)
    batch, encoder = OPTIONS.batch, OPTIONS.encoder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n== extract: {encoder} (random init), 224 px, batch {batch}, {len(coords)} patches, {device}, "
          f"{torch.get_num_threads()} threads")
    for prec in ("fp32", "bf16"):
        cfg = load_config(None, [f"encoder.name={encoder}", "encoder.pretrained=false", f"extract.precision={prec}",
                                 f"extract.batch_size={batch}"])
        prep = prepared_encoder(cfg.encoder, cfg.extract)
        imgs = patch_dataset(path, coords, attrs, 224, 8).__getitems__(list(range(len(coords))))["image"]

        def pure(prep=prep, imgs=imgs):
            with torch.inference_mode():
                for i in range(0, len(imgs), batch):
                    prep.forward_uint8(imgs[i:i + batch])

        sec_a, _ = timed(pure, repeat=1)
        a = len(coords) / sec_a
        ds = patch_dataset(path, coords, attrs, prep.encoder.input_size, cfg.extract.read_group)
        sec_b, _ = timed(partial(extract_patches, prep, ds, cfg.extract), repeat=1)
        b = len(coords) / sec_b
        print(f"  {prec}: (a) pure forward {a:6.1f} patches/s | (b) full extraction {b:6.1f} patches/s | "
              f"b/a = {b / a:.2f}")
        if prec == "fp32" and device == "cpu":
            model = prep.encoder.model.to(memory_format=torch.contiguous_format)
            naive = naive_extract(path, coords, attrs, model, batch)
            prep.encoder.model.to(memory_format=torch.channels_last)
            print(f"  fp32 naive loop (read_region per patch, PIL transforms): {naive:6.1f} patches/s | "
                  f"ours / naive = {b / naive:.2f}")


def _rss_child(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS in GB and its stdout."""
    import subprocess

    probe = code + "\nimport resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    peak = [line for line in out.splitlines() if line.startswith("PEAK_KB")][-1].split()[1]
    return int(peak) / 2**20, out


def _synthetic_cohort(folder: Path, n_bags: int, n_inst: int, dim: int) -> Path:
    """``n_bags`` features files (float32) and a labels CSV, written once."""
    from wsi_mil.h5io import write_h5

    labels = folder / "labels.csv"
    if labels.is_file():
        return labels
    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for i in range(n_bags):
        x = rng.standard_normal((n_inst, dim), dtype=np.float32)
        x[: n_inst // 20, :8] += 2.0 * (i % 2)
        write_h5(folder / "feats" / f"b{i:03d}.h5", {"features": x, "coords": np.zeros((n_inst, 2), np.int64)},
                 {"features": {"encoder_id": "bench", "feature_dim": dim}})
        rows.append(f"b{i:03d},{i % 2}")
    labels.write_text("\n".join(rows) + "\n")
    return labels


def bench_train(cache: Path, quick: bool) -> None:
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.mil.data import Bag, BagCache, BagDataset, pad_batch
    from wsi_mil.mil.digits import digits_bags, evaluate
    from wsi_mil.mil.models import MODELS, build_model
    from wsi_mil.mil.train import fit

    n_bags, n_inst, dim = (40, 500, 1024) if quick else (200, 2000, 1024)
    cfg = load_config(None, ["train.epochs=3", "train.min_epochs=3", "train.balance=none"])
    print(f"\n== train: {n_bags} bags x {n_inst} instances x {dim} dims, {cfg.model.name}, "
          f"{cfg.train.batch_size} bag per step, CPU {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    bags = [Bag(f"b{i}", torch.randn(n_inst, dim, generator=g), i % 2, f"p{i}") for i in range(n_bags)]
    torch.manual_seed(0)
    model = build_model(cfg.model, dim, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    ds = BagDataset(bags, BagCache(0))
    batches = [pad_batch([ds[j] for j in range(i, i + cfg.train.batch_size)])
               for i in range(0, n_bags, cfg.train.batch_size)]

    def pure() -> float:
        model.train()
        t0 = time.perf_counter()
        for x, mask, y in batches:
            loss = model.compute_loss(model(x, mask), y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    pure()  # warm-up
    fit_s, pure_s = [], []
    for _ in range(2):  # interleaved rounds, so drift on a shared machine hits both sides alike
        history = fit(bags, [], dim, 2, cfg.model, cfg.train, seed=0).history
        fit_s += [h["seconds"] for h in history[1:]]  # epochs timed by fit itself; the first warms up
        pure_s.append(pure())
    epoch_s, sec = statistics.median(fit_s), statistics.median(pure_s)
    a, b = n_bags / epoch_s, n_bags / sec
    print(f"  (a) training end to end : {a:7.1f} bags/s  (median epoch {epoch_s:.2f} s)")
    print(f"  (b) pure forward+backward: {b:7.1f} bags/s  (same tensors, already batched in memory)")
    print(f"  a/b = {a / b:.2f}")

    print(f"  epoch seconds per model ({n_bags} x {n_inst} x {dim}, one bag per step, 2nd epoch):")
    for name in sorted(MODELS):
        mcfg = load_config(None, [f"model.name={name}", "train.epochs=2", "train.min_epochs=2", "train.balance=none"])
        history = fit(bags, [], dim, 2, mcfg.model, mcfg.train, seed=0).history
        print(f"    {name:12s} {history[-1]['seconds']:7.2f} s", flush=True)

    train, test, inst = digits_bags(n_train=200, n_test=100, seed=0)
    print("  digits-bags (200 train bags, 100 test, target digit 9): bag AUROC / instance AUROC")
    for name in sorted(MODELS):
        dcfg = load_config(None, [f"model.name={name}", "model.hidden_dim=64", "model.attention_dim=32",
                                  "model.dropout=0.0", "train.epochs=30", "train.lr=0.002", "train.batch_size=8"])
        t0 = time.perf_counter()
        res = fit(train[40:], train[:40], 64, 2, dcfg.model, dcfg.train, seed=0)
        bag_auc, instance_auc = evaluate(res.model, test, inst)
        claim = "" if res.model.localises else "  (no localisation claimed)"
        print(f"    {name:12s} {bag_auc:.3f} / {instance_auc:.3f}  ({time.perf_counter() - t0:.1f} s){claim}", flush=True)


def bench_scale(cache: Path, quick: bool) -> None:
    """Peak RSS with a cohort 3x the bag cache, and cached vs the old all-in-memory throughput."""
    cache_gb = 0.25 if quick else 1.0
    n_inst, dim = 8000, 1024
    n_bags = int(3 * cache_gb * 2**30 / (n_inst * dim * 4)) + 1
    folder = cache / f"scale_{n_bags}x{n_inst}"
    print(f"\n== scale: {n_bags} bags x {n_inst} x {dim} float32 = {n_bags * n_inst * dim * 4 / 2**30:.2f} GB of "
          f"features on disk, train.cache_gb={cache_gb}")
    labels = _synthetic_cohort(folder, n_bags, n_inst, dim)
    common = (f"from wsi_mil.config import load_config\nfrom wsi_mil.mil.data import load_bagset, BagCache\n"
              f"from wsi_mil.mil.train import fit\nimport time, torch\n"
              f"data = load_bagset({str(folder / 'feats')!r}, {str(labels)!r})\n")
    stream = common + (f"cfg = load_config(None, ['train.epochs=2', 'train.min_epochs=2', 'train.cache_gb={cache_gb}'])\n"
                       "h = fit(data.bags, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                       "print('EPOCH', h[-1]['seconds'])")
    peak, out = _rss_child(stream)
    epoch = float([x for x in out.splitlines() if x.startswith("EPOCH")][-1].split()[1])
    print(f"  peak RSS training (2 epochs): {peak:.2f} GB  (target <= cache + 1.5 = {cache_gb + 1.5:.2f} GB); "
          f"epoch {epoch:.1f} s streaming")
    # everything fits: the new path (cache holds all) against the old one (every bag loaded up front)
    fits = common + ("from wsi_mil.mil.data import load_features\n"
                     "cfg = load_config(None, ['train.epochs=3', 'train.min_epochs=3', 'train.cache_gb=64'])\n"
                     "old = [b.__class__(b.slide_id, load_features(b.path), b.label, b.patient_id) for b in data.bags]\n"
                     "for r in range(2):\n"
                     "    new = fit(data.bags, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                     "    ref = fit(old, [], data.feature_dim, 2, cfg.model, cfg.train, seed=0).history\n"
                     "    print('NEW', *[h['seconds'] for h in new[1:]]); print('OLD', *[h['seconds'] for h in ref[1:]])")
    _, out = _rss_child(fits)
    new = [float(v) for line in out.splitlines() if line.startswith("NEW") for v in line.split()[1:]]
    old = [float(v) for line in out.splitlines() if line.startswith("OLD") for v in line.split()[1:]]
    print(f"  all cached: {statistics.median(new):.2f} s/epoch vs all in memory up front "
          f"{statistics.median(old):.2f} s/epoch: throughput ratio {statistics.median(old) / statistics.median(new):.2f} "
          f"(target >= 0.9; epochs 2-3 of two interleaved rounds)")


MIL_DATA = ["ucsb_breast_cancer", "protein", "corel_dogs", "birds_brown_creeper"]


def _mil_job(job: tuple) -> tuple:
    """One (data set, model, repeat, fold): standardise on the training bags, train with the ilse2018 recipe.

    Repeat r shuffles the stratified folds with seed r, so every model sees the same splits in a repeat."""
    import torch

    torch.set_num_threads(1)
    from sklearn.model_selection import StratifiedKFold

    from wsi_mil.config import load_config
    from wsi_mil.mil.data import Bag
    from wsi_mil.mil.train import fit, predict_bags

    path, name, repeat, fold, folds, overrides, recipe = job
    bags_x, y = _mil_bags(path)
    splits = StratifiedKFold(folds, shuffle=True, random_state=repeat).split(np.zeros(len(y)), y)
    train_idx, test_idx = list(splits)[fold]
    stack = np.concatenate([bags_x[i] for i in train_idx])
    mean, std = stack.mean(0), stack.std(0) + 1e-6

    def bag(i):
        return Bag(str(i), torch.from_numpy(((bags_x[i] - mean) / std).astype(np.float32)), int(y[i]), str(i))

    recipe_file = Path(__file__).resolve().parents[1] / "configs" / "mil" / "ilse2018.yaml"
    cfg = load_config(recipe_file if recipe == "ilse2018" else None, [f"model.name={name}", *overrides])
    val_idx = []
    if cfg.train.val_fraction > 0:  # the packaged defaults: early stopping on a stratified share of the fold
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(train_idx, test_size=cfg.train.val_fraction, stratify=y[train_idx],
                                              random_state=repeat * folds + fold)
    t0 = time.perf_counter()
    res = fit([bag(i) for i in train_idx], [bag(i) for i in val_idx], stack.shape[1], 2, cfg.model, cfg.train,
              seed=repeat * folds + fold)
    probs, _ = predict_bags(res.model, [bag(i) for i in test_idx])
    correct = int((probs.argmax(1) == y[test_idx]).sum())
    return Path(path).name.split(".")[0], name, repeat, correct, len(test_idx), time.perf_counter() - t0


_MIL_CACHE: dict = {}


def _mil_bags(path: str):
    if path not in _MIL_CACHE:  # column 0: bag label, column 1: bag id, then the instance's features
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        ids, first = np.unique(table[:, 1], return_index=True)
        bags = [table[table[:, 1] == i, 2:].astype(np.float32) for i in ids]
        _MIL_CACHE[path] = (bags, table[first, 0].astype(int))
    return _MIL_CACHE[path]


def bench_mil(cache: Path, quick: bool) -> None:
    """10-fold CV bag accuracy of every model on the classical MIL data sets (../shared/mil_benchmarks)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from wsi_mil.mil.models import MODELS

    root = Path(OPTIONS.mil_dir)
    if not root.is_dir():
        print(f"\n== mil: {root} not found; skipped")
        return
    names = OPTIONS.mil_models.split(",") if OPTIONS.mil_models else sorted(MODELS)
    data = OPTIONS.mil_data.split(",") if OPTIONS.mil_data else MIL_DATA
    folds = 3 if quick else OPTIONS.mil_folds
    repeats = OPTIONS.mil_repeats
    recipe = OPTIONS.mil_recipe
    if recipe == "ilse2018":
        overrides = [f"train.batch_size={OPTIONS.mil_batch}", f"train.epochs={OPTIONS.mil_epochs}",
                     f"train.min_epochs={OPTIONS.mil_epochs}"]
        what = f"configs/mil/ilse2018.yaml with {' '.join(overrides)}"
    else:
        overrides = ["train.num_workers=0"]
        what = ("the packaged defaults (AdamW, class-weighted loss, early stopping on 20% of each training fold, "
                "default layer sizes)")
    if OPTIONS.mil_set:
        overrides = [*overrides, *OPTIONS.mil_set]
        what += f", with {' '.join(OPTIONS.mil_set)}"
    print(f"\n== mil: {folds}-fold CV bag accuracy x {repeats} repeat(s) (folds reshuffled per repeat, the same "
          f"for every model), {what}, 2 processes")
    jobs = [(str(root / f"{d}.csv.gz"), n, r, k, folds, overrides, recipe)
            for d in data for r in range(repeats) for n in names for k in range(folds)]
    tally: dict = {}  # (data, model) -> {repeat: [correct, total, seconds, folds done]}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        for d, n, r, correct, total, sec in pool.map(_mil_job, jobs):
            t = tally.setdefault((d, n), {}).setdefault(r, [0, 0, 0.0, 0])
            t[0], t[1], t[2], t[3] = t[0] + correct, t[1] + total, t[2] + sec, t[3] + 1
            if t[3] == folds:
                print(f"  {d:22s} {n:12s} repeat {r}: accuracy {t[0] / t[1]:.3f} ({t[2]:.0f} s)", flush=True)
    print("\n| model | " + " | ".join(data) + " |\n|---|" + "---|" * len(data))
    for n in names:  # each repeat's accuracy pools its folds' test bags; mean ± std over repeats
        cells = []
        for d in data:
            accs = [c / t for c, t, _, _ in tally[(d, n)].values()]
            cells.append(f"{np.mean(accs):.3f}" + (f" ± {np.std(accs, ddof=1):.3f}" if len(accs) > 1 else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")
    _default_vs_pooling(tally, data)


def _default_vs_pooling(tally: dict, data: list[str]) -> None:
    """The issue's bar, checked where all three ran: the default head at least as accurate as the better of
    mean and max pooling (mean accuracy over repeats; with repeats, the repeats where it is behind)."""
    from wsi_mil.config import ModelConfig

    default = ModelConfig().name
    for d in data:
        runs = {n: tally.get((d, n)) for n in (default, "meanpool", "maxpool")}
        if not all(runs.values()):
            continue
        acc = {n: {r: c / t for r, (c, t, _, _) in reps.items()} for n, reps in runs.items()}
        mean = {n: float(np.mean(list(a.values()))) for n, a in acc.items()}
        best = max(("meanpool", "maxpool"), key=mean.get)
        behind = sum(acc[default][r] < max(acc["meanpool"][r], acc["maxpool"][r]) for r in acc[default])
        verdict = "holds" if mean[default] >= mean[best] else "does NOT hold"
        print(f"  {d}: default {default} {mean[default]:.3f} vs better pooling {best} {mean[best]:.3f}: {verdict} "
              f"(behind the better pooling in {behind} of {len(acc[default])} repeat(s))")


def mapped_study(cache: Path, path: Path, out_name: str):
    """``path`` tiled at 224 px / 0.25 µm/px with random 1024-d features and a random 5-fold ensemble
    (outputs under cache/out_name, reused): what the heatmap stage and the viewer need. Returns
    (layout, config, coords)."""
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.h5io import read_coords, write_h5
    from wsi_mil.layout import Layout
    from wsi_mil.mil.checkpoint import CheckpointMeta, save_checkpoint
    from wsi_mil.mil.ensemble import write_run_summary
    from wsi_mil.mil.models import build_model
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import tile_slide

    out = Layout(cache / out_name)
    cfg = load_config(None, ["tiling.target_mpp=0.25", "tiling.patch_size=224", "encoder.name=bench_enc",
                             "runner.overwrite=true"])
    if not out.patches(path.stem).exists():
        tile_slide(SlideRef(path.stem, path), cfg, out)
    coords, attrs = read_coords(out.patches(path.stem))
    feats = out.features("bench_enc", path.stem)
    if not feats.exists():
        rng = np.random.default_rng(0)
        write_h5(feats, {"features": rng.standard_normal((len(coords), 1024), np.float32), "coords": coords},
                 {"features": {"encoder_id": "bench_enc"}, "coords": attrs}, chunk_rows=1024)
    if not (out.run_dir("default") / "summary.json").exists():
        m = cfg.model
        for fold in range(5):
            torch.manual_seed(fold)
            model = build_model(m, 1024, 2)
            save_checkpoint(out.run_dir("default") / f"fold_{fold}.safetensors", model,
                            CheckpointMeta(m.model_dump(), {"normal": 0, "tumour": 1}, 1024, "bench_enc", fold))
        write_run_summary(out.run_dir("default"), {"fold_files": [f"fold_{k}.safetensors" for k in range(5)]})
    return out, cfg, coords


def bench_heatmap(cache: Path, quick: bool) -> None:
    import json

    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.heatmap import heatmap_slide

    w, h = (20000, 16000) if quick else (100_000, 80_000)
    path = big_slide(cache, w, h, 0.25)
    out, cfg, coords = mapped_study(cache, path, "heatmap_out")
    print(f"\n== heatmap: {len(coords):,} patches from cached 1024-d features, 5-fold ensemble, every export "
          f"({', '.join(cfg.heatmap.exports)}), raster {cfg.heatmap.mpp} µm/px, no refinement")
    seconds, _ = timed(lambda: heatmap_slide(SlideRef(path.stem, path), cfg, out), repeat=3)
    summary = json.loads(out.heatmap_summary("default", path.stem).read_text())
    print(f"  seconds per slide     : {seconds:.2f} s (median of 3, in-process, model loaded once)")
    print(f"  raster                : {summary['raster_shape'][1]} x {summary['raster_shape'][0]} px")


def _tile_urls(meta: dict, coords: np.ndarray, size0: float, level: int, kind: str, n: int, rng) -> list[str]:
    """``n`` distinct tile URLs of one kind at one Deep Zoom level, over tissue (patch centres)."""
    scale = 2 ** (meta["levels"] - 1 - level)
    cells = np.unique(((coords + size0 / 2) / scale // meta["tile_size"]).astype(int), axis=0)
    cells = cells[rng.permutation(len(cells))[:n]]
    sid = meta["slide_id"]
    if kind == "slide":
        return [f"/tiles/{sid}/slide/{level}/{c}_{r}.jpeg" for c, r in cells]
    return [f"/tiles/{sid}/overlay/{meta['default_map']}/jet/{level}/{c}_{r}.png" for c, r in cells]


def _load(port: int, urls: list[str], clients: int = 8) -> list[float]:
    """Fetch every URL once from ``clients`` threads (keep-alive, 127.0.0.1 only); seconds per request."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    chunks = [urls[i::clients] for i in range(clients)]

    def run(chunk):
        conn, times = http.client.HTTPConnection("127.0.0.1", port, timeout=10), []
        for url in chunk:
            t0 = time.perf_counter()
            conn.request("GET", url)
            res = conn.getresponse()
            body = res.read()
            times.append(time.perf_counter() - t0)
            if res.status != 200 or not body:
                raise RuntimeError(f"{url}: HTTP {res.status}")
        conn.close()
        return times

    with ThreadPoolExecutor(clients) as pool:
        return [t for times in pool.map(run, chunks) for t in times]


def bench_view(cache: Path, quick: bool) -> None:
    """Tile latency of ``wsi-mil view`` (a separate server process) under 8 concurrent local clients."""
    import json
    import socket
    import subprocess
    import urllib.request

    from wsi_mil.h5io import read_coords
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.heatmap import heatmap_slide

    w, h = (20000, 16000) if quick else (100_000, 80_000)
    slide = pyramid_slide(cache, "aperio 1/4/16/64", w, h)  # what scanners write, not a level at every 2x
    out, cfg, coords = mapped_study(cache, slide, "view_out")
    if not out.heatmap_summary("default", slide.stem).exists():
        heatmap_slide(SlideRef(slide.stem, slide), cfg, out)
    size0 = float(read_coords(out.patches(slide.stem))[1]["patch_size_level0"])
    listing = cache / "view_slides.csv"
    listing.write_text(f"path\n{slide.resolve()}\n")
    n = 64 if quick else 240
    print(f"\n== view: {slide.name} ({w:,} x {h:,}, JPEG, levels 1/4/16/64), 256-px tiles, {n} requests per row from 8 concurrent "
          f"keep-alive clients, server = `wsi-mil view` in its own process on 127.0.0.1 (2 cores shared)")

    def start():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "wsi_mil.cli", "view", "--out", str(out.root), "--slides",
                                 str(listing), "--port", str(port)], stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/study", timeout=2):
                    return proc, port
            except OSError:
                time.sleep(0.2)
        proc.kill()
        raise RuntimeError("the viewer did not start within 60 s")

    rng = np.random.default_rng(0)
    proc, port = start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/slides/{slide.stem}", timeout=30) as res:
            meta = json.load(res)
        deepest = meta["levels"] - 1
        # the overview: the coarsest level with n distinct tissue tiles (every cold request a new tile)
        overview = min(lv for lv in range(deepest + 1) if len(_tile_urls(meta, coords, size0, lv, "slide", n, rng)) >= n)
        rows = [(kind, name, level) for kind in ("slide", "overlay")
                for name, level in (("deepest", deepest), ("overview", overview))]
        urls = {r: _tile_urls(meta, coords, size0, r[2], r[0], n, rng) for r in rows}
        print(f"  levels: deepest {deepest} (1 level-0 px per px), overview {overview} "
              f"(1:{2 ** (deepest - overview)}, {w // 2 ** (deepest - overview)} px wide)")
        print(f"  {'tiles':22s} {'n':>4s} {'cold p50':>9s} {'cold p95':>9s} {'warm p50':>9s} {'warm p95':>9s}")
        for r in rows:
            _load(port, [f"/api/slides/{slide.stem}"], 1)  # the slide opened, its raster built: not a tile's cost
            cold = _load(port, urls[r])
            warm = _load(port, urls[r])
            c, wm = np.array(cold) * 1000, np.array(warm) * 1000
            print(f"  {r[0] + ' ' + r[1]:22s} {len(cold):4d} {np.percentile(c, 50):7.1f}ms {np.percentile(c, 95):7.1f}ms "
                  f"{np.percentile(wm, 50):7.1f}ms {np.percentile(wm, 95):7.1f}ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    print("  target: cold p95 <= 100 ms for a 256-px tile on 2 cores; warm far less")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--cache", type=Path, default=Path(".bench"))
    ap.add_argument("--quick", action="store_true", help="smaller inputs (for a smoke run)")
    ap.add_argument("--encoder", default=OPTIONS.encoder, help="extract section: preset or timm name (e.g. uni)")
    ap.add_argument("--batch", type=int, default=OPTIONS.batch, help="extract section: batch size")
    ap.add_argument("--clam", default="", help="tile section: a CLAM checkout whose create_patches_fp.py is "
                    "timed on the same slide (never vendored; needs its imports, e.g. pandas)")
    ap.add_argument("--mil-dir", default=OPTIONS.mil_dir, help="mil section: the classical data sets")
    ap.add_argument("--mil-models", default="", help="mil section: comma-separated models (default: all)")
    ap.add_argument("--mil-data", default="", help="mil section: comma-separated data sets (default: all four)")
    ap.add_argument("--mil-folds", type=int, default=OPTIONS.mil_folds)
    ap.add_argument("--mil-epochs", type=int, default=OPTIONS.mil_epochs)
    ap.add_argument("--mil-repeats", type=int, default=OPTIONS.mil_repeats,
                    help="mil section: repetitions of the k-fold CV, each with its own shuffle")
    ap.add_argument("--mil-recipe", choices=["ilse2018", "default"], default=OPTIONS.mil_recipe,
                    help="mil section: configs/mil/ilse2018.yaml, or the packaged training defaults")
    ap.add_argument("--mil-batch", type=int, default=OPTIONS.mil_batch, help="mil section: bags per step (recipe: 1)")
    ap.add_argument("--mil-set", action="append", default=[], metavar="KEY=VALUE",
                    help="mil section: a config override on top of the recipe, for every model (repeatable), "
                    "e.g. model.dropout=0.25 or train.max_instances=16")
    args = ap.parse_args()
    OPTIONS.encoder, OPTIONS.batch = args.encoder, args.batch
    OPTIONS.mil_dir, OPTIONS.mil_models, OPTIONS.mil_data = args.mil_dir, args.mil_models, args.mil_data
    OPTIONS.mil_folds, OPTIONS.mil_epochs, OPTIONS.mil_batch = args.mil_folds, args.mil_epochs, args.mil_batch
    OPTIONS.mil_repeats, OPTIONS.clam, OPTIONS.mil_recipe = args.mil_repeats, args.clam, args.mil_recipe
    OPTIONS.mil_set = args.mil_set
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        if name not in SECTIONS:
            print(f"error: unknown section '{name}' (choose from {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        fn = globals().get(f"bench_{name}")
        if fn is None:
            print(f"\n== {name}: not implemented yet")
            continue
        fn(args.cache, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
