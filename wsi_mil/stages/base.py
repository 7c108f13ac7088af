"""What a per-slide stage is, and the one way every such stage is run over a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from ..config import Config
from ..runner import BatchResult, make_executor, run_batch
from ..slide import SlideRef, open_slide
from ..slide.mpp import load_mpp_csv


@dataclass(frozen=True)
class SlideStage:
    name: str
    process: Callable[..., str | None]  # process(slide: SlideRef, cfg: Config, out: Path) -> note
    output: Callable[[Path, str, Config], Path]  # the one file whose existence means "done"
    folders: Callable[[Path, Config], list[Path]]  # where temp leftovers may be
    gpu: bool = False
    setup: Callable[[Config, Path], object] | None = None  # run once before the batch (fail fast, one line)


_PROCESS_CACHE: dict[str, tuple[str, object]] = {}


def per_process(name: str, key: str, build: Callable[[], object]):
    """One heavy object (an encoder on its device, a fold ensemble) per process, rebuilt when ``key`` changes."""
    hit = _PROCESS_CACHE.get(name)
    if hit is None or hit[0] != key:
        _PROCESS_CACHE.pop(name, None)  # free the old one before building the new one
        _PROCESS_CACHE[name] = (key, build())
    return _PROCESS_CACHE[name][1]


@lru_cache(maxsize=8)
def _overrides(path: str | None) -> dict:
    return load_mpp_csv(path)


def open_configured(slide: SlideRef, cfg: Config):
    """Open a slide with the configured backend and its mpp resolved (override CSV first)."""
    csv = str(cfg.slides.mpp_csv) if cfg.slides.mpp_csv else None
    return open_slide(slide.path, cfg.slides, _overrides(csv), slide.slide_id)


def run_stage(stage: SlideStage, slides: list[SlideRef], cfg: Config, out: Path,
              progress: bool = True) -> BatchResult:
    out = Path(out)
    if stage.setup is not None:
        stage.setup(cfg, out)
    r = cfg.runner
    executor = make_executor(r.executor, r.workers, r.retries, r.dask_address,
                             resources={"GPU": 1} if stage.gpu else None)
    return run_batch(
        stage.name, slides, partial(stage.process, cfg=cfg, out=out),
        lambda sid: stage.output(out, sid, cfg), out, executor, r.overwrite, stage.folders(out, cfg), progress,
    )
