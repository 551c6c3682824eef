"""The frozen scGPT encoder: import shim, checkpoint, gene vocabulary, feature extraction, calibration, cache."""
