"""Rule calibrate_latent: running mean/var of frozen scGPT features over a fold's training cells."""

from ccfm.logs import setup_rule
from ccfm.scgpt.calibration import calibrate_to_files

setup_rule(snakemake.log[0], snakemake.threads)
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
