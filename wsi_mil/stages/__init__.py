"""Stage glue: each stage is a pure per-slide function plus where its outputs live.

The CLI and ``pipelines/`` look stages up here; the batch mechanics live in :mod:`wsi_mil.runner`.
"""
