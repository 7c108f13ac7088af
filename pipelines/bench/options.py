"""The bench's typed options: one frozen record, parsed once, handed to every section."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    cache: Path = Path(".bench")
    quick: bool = False
    encoder: str = "resnet50_trunc"  # extract: preset or timm name
    batch: int = 32  # extract: batch size
    patches: int = 0  # extract: patches timed (0: 256, or 16 with --quick)
    clam: str = ""  # tile, train: a CLAM checkout timed on the same inputs (create_patches_fp.py, main.py)
    mil_dir: Path = Path("../shared/mil_benchmarks")
    mil_models: tuple[str, ...] = ()  # default: every registered head
    mil_data: tuple[str, ...] = ()  # default: all four data sets
    mil_folds: int = 10
    mil_epochs: int = 20
    mil_batch: int = 1
    mil_repeats: int = 3  # the bar: at least 3 repeats of 10-fold CV
    mil_recipe: str = "ilse2018"  # ilse2018 | default
    mil_set: tuple[str, ...] = ()  # config overrides on top of the recipe
    spatial_models: tuple[str, ...] = ()  # spatial: default every registered head
    spatial_set: tuple[str, ...] = ()  # spatial: config overrides on top of its recipe


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


def parser(sections: list[str]) -> argparse.ArgumentParser:
    d = Options()
    ap = argparse.ArgumentParser(prog="make bench", description="throughput figures, each section's ratios taken "
                                 "in one run (docs/benchmarks.md)")
    ap.add_argument("--only", default=",".join(sections), help=f"comma-separated sections ({', '.join(sections)})")
    ap.add_argument("--cache", type=Path, default=d.cache)
    ap.add_argument("--quick", action="store_true", help="smaller inputs (the smoke run in make test)")
    ap.add_argument("--encoder", default=d.encoder, help="extract section: preset or timm name (e.g. uni)")
    ap.add_argument("--batch", type=int, default=d.batch, help="extract section: batch size")
    ap.add_argument("--patches", type=int, default=d.patches,
                    help="extract section: patches timed (default 256; 16 with --quick)")
    ap.add_argument("--clam", default=d.clam, help="tile and train sections: a CLAM checkout whose "
                    "create_patches_fp.py (tile) and main.py (train, WSI-scale row) are timed on the same inputs "
                    "(never vendored; needs its imports: pandas<3, and smooth-topk on PYTHONPATH for the SVM loss)")
    ap.add_argument("--mil-dir", type=Path, default=d.mil_dir, help="mil section: the classical data sets")
    ap.add_argument("--mil-models", default="", help="mil section: comma-separated models (default: all)")
    ap.add_argument("--mil-data", default="", help="mil section: comma-separated data sets (default: all four)")
    ap.add_argument("--mil-folds", type=int, default=d.mil_folds)
    ap.add_argument("--mil-epochs", type=int, default=d.mil_epochs)
    ap.add_argument("--mil-repeats", type=int, default=d.mil_repeats,
                    help="mil section: repetitions of the k-fold CV, each with its own shuffle")
    ap.add_argument("--mil-recipe", choices=["ilse2018", "default"], default=d.mil_recipe,
                    help="mil section: configs/mil/ilse2018.yaml, or the packaged training defaults")
    ap.add_argument("--mil-batch", type=int, default=d.mil_batch, help="mil section: bags per step (recipe: 1)")
    ap.add_argument("--mil-set", action="append", default=[], metavar="KEY=VALUE",
                    help="mil section: a config override on top of the recipe, for every model (repeatable), "
                    "e.g. model.dropout=0.25 or train.max_instances=16")
    ap.add_argument("--spatial-models", default="", help="spatial section: comma-separated heads (default: all)")
    ap.add_argument("--spatial-set", action="append", default=[], metavar="KEY=VALUE",
                    help="spatial section: a config override for every head (repeatable), e.g. train.lr=0.0005")
    return ap


def from_args(args: argparse.Namespace) -> Options:
    return Options(cache=args.cache, quick=args.quick, encoder=args.encoder, batch=args.batch,
                   patches=args.patches, clam=args.clam,
                   mil_dir=args.mil_dir, mil_models=_names(args.mil_models), mil_data=_names(args.mil_data),
                   mil_folds=args.mil_folds, mil_epochs=args.mil_epochs, mil_batch=args.mil_batch,
                   mil_repeats=args.mil_repeats, mil_recipe=args.mil_recipe, mil_set=tuple(args.mil_set),
                   spatial_models=_names(args.spatial_models), spatial_set=tuple(args.spatial_set))
