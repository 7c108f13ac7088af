"""``wsi-mil <stage> --slides DIR --out DIR [--config FILE] [key=value ...]``.

User errors print one line (``error: ...``) and exit 2. A batch with failed slides exits 1 after a
summary line; each failure's one-line reason is in ``<out>/manifest.csv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from pathlib import Path

from .config import Config, load_config, render_config
from .errors import WsiMilError, one_line
from .layout import Layout
from .slide import discover_slides

SLIDE_STAGES = {"tile": "wsi_mil.stages.tile", "extract": "wsi_mil.stages.extract",
                "heatmap": "wsi_mil.stages.heatmap"}
HELP = {
    "tile": "tissue masks and patch coordinates -> patches/<slide_id>.h5",
    "extract": "encoder features for every patch -> features/<encoder_id>/<slide_id>.h5",
    "train": "cross-validated attention MIL on cached features -> models/<run_name>/",
    "predict": "apply a checkpoint or a run's fold ensemble -> predictions/<run>.csv",
    "evaluate": "a trained run on another cohort, metrics with 95% bootstrap intervals -> evaluations/<run>/<name>/",
    "heatmap": "attention heatmaps and exports -> heatmaps/<run_name>/<slide_id>/",
    "run": "every stage in order (tile, extract, then train or predict, heatmap)",
    "export": "a study's features and patches in CLAM, TRIDENT or torchmil layout -> --to DIR",
    "compare": "MIL heads trained on the same folds, side by side -> comparison.{csv,md,png}",
    "view": "the study in the browser: slides, predictions, deep-zoom heatmaps (http://127.0.0.1:8000/)",
    "serve": "a prediction service: HTTP jobs through tile, extract, predict, heatmap (http://127.0.0.1:8010/docs)",
    "config": "print the effective configuration (defaults + --config + overrides) as commented YAML",
    "encoders": "list the encoder presets: feature width, native tile, transform, pooling, weight formats, licence",
    "models": "list the MIL heads: paper, whether they localise or use positions, per-class maps, tasks",
}
log = logging.getLogger("wsi_mil")


def build_parser() -> argparse.ArgumentParser:
    usage, contract = (part.replace("``", "") for part in __doc__.strip().split("\n\n"))
    p = argparse.ArgumentParser(prog="wsi-mil", description=usage, epilog=contract)
    sub = p.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, text in HELP.items():
        sp = sub.add_parser(name, help=text.replace("%", "%%"), description=text)  # help texts are %-formatted
        if name == "compare":  # reads run folders only: no config, no overrides
            sp.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (e.g. OUT/models/*)")
            sp.add_argument("--output", type=Path, help="where to write (default: the runs' parent folder)")
            continue
        if name in ("encoders", "models"):  # read their registries only
            continue
        if name == "view":  # serves one output folder read-only: no config
            sp.add_argument("--out", type=Path, required=True, help="the study's output folder")
            sp.add_argument("--slides", type=Path, help="folder or CSV of the slides (default: paths the tile "
                            "stage recorded)")
            sp.add_argument("--run", help="which run's heatmaps to show (default: 'default' or the only one)")
            sp.add_argument("--host", default="127.0.0.1", help="bind address; any but loopback needs the token")
            sp.add_argument("--port", type=int, default=8000)
            sp.add_argument("--open", action="store_true", help="open the study page in the browser")
            sp.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                            help="also accept requests whose Host is NAME (repeatable; '*' for any)")
            continue
        sp.add_argument("--config", type=Path, help="YAML config (see wsi-mil config)")
        if name != "config":
            sp.add_argument("--out", type=Path, required=True, help="output folder")
            sp.add_argument("-v", "--verbose", action="store_true")
        if name in ("tile", "extract", "train", "predict", "heatmap", "run"):
            sp.add_argument("--slides", type=Path, required=name in {"tile", "extract"},
                            help="folder of slides, or a CSV with a 'path' column")
            sp.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist")
            sp.add_argument("--recursive", action="store_true", help="search --slides recursively")
            sp.add_argument("--executor", choices=["serial", "process", "dask"], help="runner.executor")
            sp.add_argument("--workers", type=int, help="runner.workers")
            sp.add_argument("--dask-address", help="join an existing Dask cluster (tcp://host:port)")
            sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "serve":
            sp.add_argument("--model", type=Path, help="a run folder or checkpoint (default: models/<train.run_name>)")
            sp.add_argument("--host", default="127.0.0.1", help="bind address; any but loopback needs the token")
            sp.add_argument("--port", type=int, default=8010)
            sp.add_argument("--slides-root", type=Path, action="append", default=[], metavar="DIR",
                            help="a folder whose slides jobs may name by path (repeatable; none: uploads only)")
            sp.add_argument("--dicomweb-root", action="append", default=[], metavar="URL",
                            help="a DICOMweb root whose series jobs may name (repeatable; credentials from the "
                                 "WSI_MIL_DICOMWEB_* environment)")
            sp.add_argument("--max-queue", type=int, default=16, help="open jobs at most; more get 429")
            sp.add_argument("--max-upload-mb", type=float, default=4096, help="request body limit; more get 413")
            sp.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                            help="also accept requests whose Host is NAME (repeatable; '*' for any)")
        if name == "train":
            sp.add_argument("--nproc", type=int, default=1, metavar="N",
                            help="data-parallel ranks on this machine, each fit under DDP (gloo on CPU, NCCL on GPUs)")
        if name in ("predict", "run"):
            sp.add_argument("--model", type=Path, help="a checkpoint file or a run folder (default: models/<run>)")
        if name == "predict":
            sp.add_argument("--features", type=Path, help="folder of feature .h5 files")
            sp.add_argument("--output", type=Path, help="CSV to write (default <out>/predictions/<run>.csv)")
        if name == "evaluate":
            sp.add_argument("--model", type=Path, help="a run folder or checkpoint (default: models/<train.run_name>)")
            sp.add_argument("--labels", type=Path, required=True, help="the cohort's labels CSV (as the run's task reads)")
            sp.add_argument("--features", type=Path, help="folder of feature .h5 files (default: <out>/features/<encoder>)")
            sp.add_argument("--name", help="the evaluation's name (default: the labels file's name)")
            sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "export":
            sp.add_argument("--format", required=True, choices=["clam", "trident", "torchmil"])
            sp.add_argument("--to", type=Path, required=True, help="folder to write the tool's layout into")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def _config(args) -> Config:
    overrides = list(getattr(args, "overrides", []))
    flags = {"overwrite": "runner.overwrite=true", "recursive": "slides.recursive=true"}
    for flag, pair in flags.items():
        if getattr(args, flag, False):
            overrides.append(pair)
    if getattr(args, "executor", None):
        overrides.append(f"runner.executor={args.executor}")
    if getattr(args, "workers", None) is not None:
        overrides.append(f"runner.workers={args.workers}")
    if getattr(args, "dask_address", None):
        overrides += [f"runner.dask_address={args.dask_address}", "runner.executor=dask"]
    return load_config(getattr(args, "config", None), overrides)


def _slides(args, cfg: Config):
    if args.slides is None:
        raise WsiMilError(f"{args.stage}: --slides is required")
    slides = discover_slides(args.slides, cfg.slides.extensions, cfg.slides.recursive, cfg.slides.dicom_id_attribute)
    if not slides:
        raise WsiMilError(f"no slides found in {args.slides} (extensions: {' '.join(cfg.slides.extensions)})")
    return slides


def _writable(out: Path) -> Layout:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiMilError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise WsiMilError(f"--out {out}: not writable (outputs, locks and manifest.csv are written there)")
    return Layout(out)


def dispatch(args, cfg: Config) -> int:
    if args.stage == "compare":
        from .mil.compare import write_comparison

        missing = [str(r) for r in args.runs if not r.exists()]
        if missing:
            raise WsiMilError(f"compare: no such run folder: {', '.join(missing)}")
        runs = [r for r in args.runs if r.is_dir() and not r.name.startswith(".")]
        if len(runs) < 1:
            raise WsiMilError("compare: give one or more run folders")
        out = args.output or runs[0].parent
        rows = write_comparison(runs, out)
        print(f"compare: {len(rows)} runs -> {out / 'comparison.md'}")
        return 0
    if args.stage == "view":
        from .viewer.serve import serve

        serve(args.out, args.slides, args.run, args.host, args.port, args.open, tuple(args.allow_host))
        return 0
    if args.stage == "config":
        sys.stdout.write(render_config(cfg))
        return 0
    if args.stage == "models":
        from .mil.models.table import text_table as head_table

        print(head_table(), end="")
        return 0
    if args.stage == "encoders":
        from .features.encoders.table import text_table

        sys.stdout.write(text_table())
        return 0
    if args.stage == "export":
        from .interop import export_study, load_study

        print(export_study(args.format, load_study(args.out, cfg.encoder.name, cfg.train.labels,
                                                           cfg.train.fold_label_case, cfg.train), args.to))
        return 0
    layout = _writable(args.out)
    if args.stage == "serve":
        from .service import serve

        serve(layout, cfg, args.model, args.host, args.port, tuple(args.slides_root), args.max_queue,
              args.max_upload_mb, tuple(args.allow_host), tuple(args.dicomweb_root))
        return 0
    progress = not args.no_progress
    if args.stage in SLIDE_STAGES:
        from .stages.base import run_stage

        stage = importlib.import_module(SLIDE_STAGES[args.stage]).STAGE
        result = run_stage(stage, _slides(args, cfg), cfg, layout, progress=progress)
        print(result.summary())
        return 0 if result.ok else 1
    if args.stage == "train":
        if args.nproc < 1:
            raise WsiMilError(f"--nproc {args.nproc}: give 1 or more ranks")
        if args.nproc > 1:
            from .mil.ddp import launch

            return launch(args.nproc, main, _without_nproc(sys.argv[1:] if args.argv is None else args.argv))
        from .stages.train import train

        train(layout, cfg, progress=progress)
        return 0
    if args.stage == "predict":
        from .stages.predict import predict

        result = predict(layout, cfg, model=args.model, features=args.features, output=args.output)
        print(result.summary())
        return 0 if result.ok else 1
    if args.stage == "evaluate":
        from .stages.evaluate import evaluate, summary_line

        summary, folder = evaluate(layout, cfg, args.labels, model=args.model, features=args.features, name=args.name,
                                   progress=progress)
        print(summary_line(summary, folder))
        return 0
    if args.stage == "run":
        from .workflow import run_pipeline

        outcomes = run_pipeline(_slides(args, cfg), layout, cfg, model=args.model, progress=progress)
        for outcome in outcomes:
            print(outcome.line)
        failed = [o.stage for o in outcomes if not o.ok]
        print(f"run: {'failed in ' + ', '.join(failed) if failed else 'every stage done'}")
        return 1 if failed else 0
    raise WsiMilError(f"unknown stage {args.stage}")


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand anywhere, before or after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not (hasattr(args, "overrides") and OVERRIDE.match(a))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line a spawned rank runs: the same, without ``--nproc N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _new_folders(path: Path | None) -> list[Path]:
    """The folders of ``path`` that do not exist yet, deepest first: what --out's mkdir would create."""
    new = []
    while path is not None and not path.exists() and path != path.parent:
        new.append(path)
        path = path.parent
    return new


def _remove_if_empty(folders: list[Path]) -> None:
    """A command refused for a user error leaves no trace: the --out folders it created, if still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    created = _new_folders(getattr(args, "out", None))
    try:
        return dispatch(args, _config(args))
    except WsiMilError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        _remove_if_empty(created)
        return 2
    except OSError as exc:  # a full disk, a vanished folder: one line, not a traceback
        log.debug("OS error", exc_info=True)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        _remove_if_empty(created)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
