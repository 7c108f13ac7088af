"""Stage glue, wired to the runner. ``tile``, ``extract`` and ``heatmap`` are per-slide functions run as
batches (:mod:`.base`); ``train`` and ``predict`` work on a whole cohort of cached features. Stages never
import each other: what they share lives below them (layout, features, mil, heatmap, runner).
"""
