"""wsi_mil: whole-slide images to attention-MIL predictions and heatmaps.

The package reads as the pipeline:
slide (reading) -> tissue -> tiling -> features -> mil -> heatmap,
with ``runner`` doing batch/resume/locking for every stage.
"""

__version__ = "0.1.0"
