"""Rule calibrate_latent: running mean/var of frozen scGPT features over a fold's training cells."""

from ccfm.logs import setup_rule_logging
from ccfm.scgpt.calibration import calibrate_to_files

log = setup_rule_logging(snakemake.log[0])
calibrate_to_files(
    snakemake.input.processed,
    snakemake.input.split,
    snakemake.input.gene_vocab,
    snakemake.input.model,
    snakemake.output.stats,
    latent=snakemake.params.latent,
    seed=snakemake.params.seed,
    threads=snakemake.threads,
)
