"""The CCFM model: network, flow-matching denoiser, mean model, checkpoint format, training, generation."""
