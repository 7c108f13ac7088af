"""OME-TIFF: a pyramidal OME-TIFF (levels as SubIFDs, as bfconvert and tifffile write them), its pixels
read by tiffslide and its µm/px taken from the OME-XML (``Pixels`` ``PhysicalSizeX/Y`` with their units).

OpenSlide sees such a file as a one-level generic TIFF without mpp, and tiffslide finds its levels but not
its physical size, so this backend is tried before both and only accepts files that carry OME-XML.
"""

from __future__ import annotations

from pathlib import Path

from .backends import NotThisFormat, register_backend
from .tiffslide_backend import TiffSlideBackend

UM_PER = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def ome_mpp(path: Path) -> tuple[float | None, float | None]:
    """(x, y) µm/px from the first OME ``Pixels`` element; None where absent or in an unknown unit."""
    import tifffile

    if path.is_dir():
        raise NotThisFormat("a folder")
    try:
        tif = tifffile.TiffFile(str(path))
    except tifffile.TiffFileError:
        raise NotThisFormat("not a TIFF") from None  # OpenSlide and tiffslide say why, once
    with tif:
        if not tif.is_ome:
            raise NotThisFormat("not an OME-TIFF")
        meta = tifffile.xml2dict(tif.ome_metadata)
    image = meta["OME"]["Image"]
    pixels = (image[0] if isinstance(image, list) else image)["Pixels"]

    def size(axis: str) -> float | None:
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        return float(value) * UM_PER[unit] if value is not None and unit in UM_PER else None

    return size("X"), size("Y")


@register_backend("ometiff", priority=8)
class OmeTiffBackend(TiffSlideBackend):
    def __init__(self, path: Path):
        x, y = ome_mpp(Path(path))  # refuses files without OME-XML before tiffslide opens them
        super().__init__(path)
        if x is not None:
            self.properties.update({"ome.mpp-x": x, "ome.mpp-y": y if y is not None else x})
