"""What a per-slide stage is, and the one way every such stage is run over a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from ..config import Config
from ..errors import WsiMilError
from ..layout import Layout
from ..runner import BatchResult, make_executor, run_batch
from ..slide import SlideRef, open_slide
from ..slide.backends import backend_order
from ..slide.mpp import load_mpp_csv


@dataclass(frozen=True)
class SlideStage:
    name: str
    process: Callable[..., str | None]  # process(slide: SlideRef, cfg: Config, layout: Layout) -> note
    output: Callable[[Layout, str, Config], Path]  # the one file whose existence means "done"
    folders: Callable[[Layout, Config], list[Path]]  # where temp leftovers may be
    complete: Callable[[Path, Config], bool] | None = None  # is an existing output really complete?
    gpu: bool = False
    setup: Callable[[Config, Layout], object] | None = None  # run once before the batch (fail fast, one line)


def current(reason: str) -> bool:
    """The end of a stage's completeness check: True for an output this run would make again, else the
    reason it would not, raised so the runner redoes the slide and records ``redone (<reason>)``."""
    if reason:
        raise WsiMilError(reason)
    return True


@lru_cache(maxsize=8)
def _overrides(path: str | None) -> dict:
    return load_mpp_csv(path)


def open_configured(slide: SlideRef, cfg: Config):
    """Open a slide with the configured backend and its mpp resolved (override CSV first)."""
    csv = str(cfg.slides.mpp_csv) if cfg.slides.mpp_csv else None
    return open_slide(slide.path, cfg.slides, _overrides(csv), slide.slide_id)


def run_stage(stage: SlideStage, slides: list[SlideRef], cfg: Config, out: Path | Layout,
              progress: bool = True) -> BatchResult:
    layout = out if isinstance(out, Layout) else Layout(out)
    backend_order(cfg.slides.backend)  # an unknown slides.backend is one line before any slide, not one per slide
    if stage.setup is not None:
        stage.setup(cfg, layout)
    r = cfg.runner
    executor = make_executor(r.executor, r.workers, r.retries, r.dask_address,
                             resources={"GPU": 1} if stage.gpu else None)
    kw = {"complete": partial(stage.complete, cfg=cfg)} if stage.complete else {}
    return run_batch(
        stage.name, slides, partial(stage.process, cfg=cfg, layout=layout),
        lambda sid: stage.output(layout, sid, cfg), layout.root, executor, r.overwrite,
        stage.folders(layout, cfg), progress, **kw,
    )
