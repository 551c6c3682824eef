"""Dataset stages: condition labels, input validation, preprocessing, splits, the simulator, downloads."""
