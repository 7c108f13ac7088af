"""Patch features: encoder registry, patch dataset and the extraction engine."""
