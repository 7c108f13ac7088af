"""Multiple-instance learning on cached bags: models, data, splits, training, metrics, checkpoints."""
