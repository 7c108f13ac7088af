"""``wsi-mil <stage> --slides DIR --out DIR [--config FILE] [key=value ...]``.

User errors print one line (``error: ...``) and exit 2. A batch with failed slides exits 1 after a
summary line; each failure's one-line reason is in ``<out>/manifest.csv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import WsiMilError, one_line
from .slide import discover_slides

SLIDE_STAGES = {"tile": "wsi_mil.stages.tile", "extract": "wsi_mil.stages.extract",
                "heatmap": "wsi_mil.stages.heatmap"}
STAGES = ["tile", "extract", "train", "predict", "heatmap", "run"]
log = logging.getLogger("wsi_mil")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi-mil", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True, metavar="stage")
    helps = {
        "tile": "tissue masks and patch coordinates -> patches/<slide_id>.h5",
        "extract": "encoder features for every patch -> features/<encoder_id>/<slide_id>.h5",
        "train": "cross-validated attention MIL on cached features -> models/<run_name>/",
        "predict": "apply a checkpoint or a run's fold ensemble -> predictions CSV",
        "heatmap": "attention heatmaps and exports -> heatmaps/<run_name>/<slide_id>/",
        "run": "every stage in order (tile, extract, then train or predict, heatmap)",
    }
    for name in STAGES:
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        sp.add_argument("--slides", type=Path, required=name in {"tile", "extract"},
                        help="folder of slides, or a CSV with a 'path' column")
        sp.add_argument("--out", type=Path, required=True, help="output folder")
        sp.add_argument("--config", type=Path, help="YAML config (see configs/default.yaml)")
        sp.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist")
        sp.add_argument("--recursive", action="store_true", help="search --slides recursively")
        sp.add_argument("--executor", choices=["serial", "process", "dask"], help="runner.executor")
        sp.add_argument("--workers", type=int, help="runner.workers")
        sp.add_argument("--dask-address", help="join an existing Dask cluster (tcp://host:port)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true")
        if name in ("predict", "run"):
            sp.add_argument("--model", type=Path, help="a checkpoint file or a run folder (default: models/<run>)")
            sp.add_argument("--features", type=Path, help="folder of feature .h5 files")
            sp.add_argument("--output", type=Path, help="CSV to write (default <out>/predictions/<run>.csv)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def _config(args) -> Config:
    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("runner.overwrite=true")
    if args.executor:
        overrides.append(f"runner.executor={args.executor}")
    if args.workers is not None:
        overrides.append(f"runner.workers={args.workers}")
    if args.dask_address:
        overrides += [f"runner.dask_address={args.dask_address}", "runner.executor=dask"]
    if args.recursive:
        overrides.append("slides.recursive=true")
    return load_config(args.config, overrides)


def run_slide_stage(name: str, args, cfg: Config) -> int:
    from .stages.base import run_stage

    if args.slides is None:
        raise WsiMilError(f"{name}: --slides is required")
    slides = discover_slides(args.slides, cfg.slides.extensions, cfg.slides.recursive)
    if not slides:
        raise WsiMilError(f"no slides found in {args.slides} (extensions: {' '.join(cfg.slides.extensions)})")
    stage = importlib.import_module(SLIDE_STAGES[name]).STAGE
    result = run_stage(stage, slides, cfg, args.out, progress=not args.no_progress)
    print(result.summary())
    return 0 if result.ok else 1


def dispatch(args, cfg: Config) -> int:
    if args.stage in SLIDE_STAGES:
        return run_slide_stage(args.stage, args, cfg)
    if args.stage == "train":
        from .stages.train import train_command

        return train_command(args, cfg)
    if args.stage == "predict":
        from .stages.predict import predict_command

        return predict_command(args, cfg)
    if args.stage == "run":
        from .stages.predict import run_command

        return run_command(args, cfg)
    raise WsiMilError(f"unknown stage {args.stage}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _config(args)
        args.out.mkdir(parents=True, exist_ok=True)
        return dispatch(args, cfg)
    except WsiMilError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
