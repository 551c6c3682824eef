"""File formats: streaming h5ad readers and writers, atomic writes, the split file, control cells, predictions."""
