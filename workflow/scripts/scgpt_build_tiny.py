"""Rule scgpt_build_tiny: a small randomly initialised scGPT checkpoint (no network)."""

from pathlib import Path

from ccfm.logs import setup_rule_logging
from ccfm.scgpt.checkpoint import build_tiny_checkpoint

log = setup_rule_logging(snakemake.log[0])
build_tiny_checkpoint(Path(snakemake.output.model).parent, seed=snakemake.params.seed, **snakemake.params.sizes)
