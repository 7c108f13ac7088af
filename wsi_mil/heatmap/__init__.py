"""Attention heatmaps: per-patch scores, slide-aligned rasters, and exports pathologists can open."""
