"""Rule scgpt_build_tiny: a small randomly initialised scGPT checkpoint (no network)."""

from pathlib import Path

from ccfm.config import scgpt_settings
from ccfm.logs import setup_rule
from ccfm.scgpt.checkpoint import build_tiny_checkpoint

setup_rule(snakemake.log[0], snakemake.threads)
# params.sizes holds only the user's `scgpt.tiny` keys (a rerun trigger); the schema's defaults fill the rest.
sizes = scgpt_settings({"scgpt": {"tiny": dict(snakemake.params.sizes)}})["tiny"]
build_tiny_checkpoint(Path(snakemake.output.model).parent, seed=snakemake.params.seed, **sizes)
