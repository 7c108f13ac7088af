"""formats: one slide in each container (SVS, DICOM WSI folder, OME-TIFF, flat TIFF, PNG), 224-px regions
read per second through our reader, plus OpenSlide 4 on the DICOM folder (the reader wsidicom was chosen
over), all in one run. Needs ../shared/slides/cmu-1-small-region.svs and wsidicomizer (+ libturbojpeg)."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

from .options import Options

CMU = Path("../shared/slides/cmu-1-small-region.svs")


def _containers(cache: Path) -> dict[str, Path]:
    import cv2
    import tifffile
    from wsidicomizer import WsiDicomizer

    from wsi_mil.slide import open_slide

    root = cache / "formats"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "dicom").mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            WsiDicomizer.convert(str(CMU), str(root / "dicom"), include_label=True, include_overview=True)
        with open_slide(CMU) as reader:
            base = reader.read_region((0, 0), 0, reader.dimensions)
        tifffile.imwrite(root / "flat.tif", base, photometric="rgb", rowsperstrip=64, compression="zlib",
                         resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
        meta = {"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499}
        tifffile.imwrite(root / "ome.ome.tif", base, tile=(256, 256), compression="jpeg", photometric="rgb",
                         metadata=meta, bigtiff=True)
        cv2.imwrite(str(root / "flat.png"), base[..., ::-1])
        (root / "done").touch()
    return {"svs": CMU, "dicom": root / "dicom", "ome": root / "ome.ome.tif", "flat_tiff": root / "flat.tif",
            "png": root / "flat.png"}


def _rate(read, coords, repeat: int) -> float:
    read(coords[0])
    t0 = time.perf_counter()
    for _ in range(repeat):
        for c in coords:
            read(c)
    return repeat * len(coords) / (time.perf_counter() - t0)


def run(opts: Options) -> None:
    print("\n== formats: 224-px regions/s of cmu-1-small-region (2,220 x 2,967) in each container, one run")
    try:
        import wsidicomizer  # noqa: F401
        from opentile.jpeg.jpeg import find_turbojpeg_path

        find_turbojpeg_path()
    except (ImportError, FileNotFoundError):
        print("  skipped: needs wsidicomizer and libturbojpeg (pip install -e '.[dev]'; apt-get install libturbojpeg0)")
        return
    if not CMU.is_file():
        print(f"  skipped: {CMU} is not present")
        return
    import numpy as np
    import openslide

    from wsi_mil.config import SlidesConfig
    from wsi_mil.slide import open_slide

    paths = _containers(opts.cache)
    coords = [(x, y) for x in range(0, 1996, 224) for y in range(0, 2743, 224)]
    repeat = 1 if opts.quick else 5
    rates = {}
    for name, path in paths.items():
        with open_slide(path, SlidesConfig(default_mpp=0.499)) as reader:
            rates[f"{name} ({reader.backend})"] = _rate(lambda c, r=reader: r.read_region(c, 0, (224, 224)), coords, repeat)
    first = sorted((paths["dicom"]).glob("*.dcm"), key=lambda p: -p.stat().st_size)[0]
    with openslide.OpenSlide(str(first)) as slide:
        rates["dicom (openslide 4)"] = _rate(lambda c: np.asarray(slide.read_region(c, 0, (224, 224))), coords, repeat)
    base = rates["svs (openslide)"]
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:8.0f} regions/s   {rate / base:5.2f}x the svs")
    _dicomweb(opts, paths)


def _stage_seconds(stage: str, slides: Path, out: Path, extra: list[str]) -> float:
    from wsi_mil.cli import main

    shutil.rmtree(out, ignore_errors=True)
    if stage == "extract":
        assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress", *extra]) == 0
        shutil.rmtree(out / "features", ignore_errors=True)
    t0 = time.perf_counter()
    assert main([stage, "--slides", str(slides), "--out", str(out), "--no-progress", *extra]) == 0
    return time.perf_counter() - t0


def _dicomweb(opts: Options, paths: dict[str, Path]) -> None:
    """tile and extract of the slide read over DICOMweb from a local Orthanc vs from the svs file."""
    import csv
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipelines import orthanc

    why = orthanc.missing()
    if why:
        print(f"  DICOMweb: skipped: {why}")
        return
    import pydicom

    root = opts.cache / "formats_web"
    shutil.rmtree(root, ignore_errors=True)
    srv = orthanc.Orthanc(root / "orthanc").start()
    try:
        srv.upload(paths["dicom"])
        ds = pydicom.dcmread(next(paths["dicom"].iterdir()), stop_before_pixels=True)
        web_csv, local = root / "web.csv", root / "local"
        with web_csv.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "dicomweb_url", "study_uid", "series_uid"])
            w.writerow(["cmu", srv.dicomweb, ds.StudyInstanceUID, ds.SeriesInstanceUID])
        local.mkdir()
        shutil.copy(paths["svs"], local / "cmu.svs")
        os.environ.update({"WSI_MIL_DICOMWEB_USER": srv.user, "WSI_MIL_DICOMWEB_PASSWORD": srv.password})
        enc = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0"]
        repeat = 1 if opts.quick else 3
        for stage in ("tile", "extract"):
            times = {name: min(_stage_seconds(stage, src, root / f"out_{name}", enc) for _ in range(repeat))
                     for name, src in (("svs file", local), ("DICOMweb", web_csv))}
            print(f"  {stage:8s} svs file {times['svs file']:.2f} s, DICOMweb (Orthanc on 127.0.0.1) "
                  f"{times['DICOMweb']:.2f} s: web / file = {times['DICOMweb'] / times['svs file']:.2f}")
    finally:
        srv.stop()
