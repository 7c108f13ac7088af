"""Typed file contracts: one reader/writer pair and one frozen record per file one stage hands another.

- :mod:`.patches`: ``patches/<slide_id>.h5`` (tile) -> :class:`PatchSpec`, the coords, the tissue mask;
- :mod:`.features`: ``features/<encoder_id>/<slide_id>.h5`` (extract) -> :class:`FeatureSpec`, the bag;
- :mod:`.scores`: ``heatmaps/<run>/<slide_id>/scores.h5`` (heatmap) -> :class:`Scores`.

No other module reads these files' datasets or attributes by key (the viewer and the exporters may not
import h5py at all: ``make lint``). A record's ``to_attrs`` / ``from_attrs`` are each other's inverse, and
``from_attrs`` takes files written before a field existed.
"""

from .features import (
    FeatureSpec,
    bag_size,
    feature_fingerprint,
    read_bag,
    read_bag_cells,
    read_feature_coords,
    read_feature_spec,
    write_features,
)
from .patches import (
    PatchSpec,
    TissueMask,
    read_grid_index,
    read_patch_file,
    read_patch_spec,
    read_tissue_mask,
    write_patch_file,
)
from .scores import Scores, read_scores, write_scores

__all__ = ["FeatureSpec", "PatchSpec", "Scores", "TissueMask", "bag_size", "feature_fingerprint", "read_bag",
           "read_bag_cells", "read_feature_coords", "read_feature_spec", "read_grid_index", "read_patch_file",
           "read_patch_spec", "read_scores", "read_tissue_mask", "write_features", "write_patch_file",
           "write_scores"]
