"""Rule preprocess: raw h5ad -> results/{ds}/processed.h5ad."""

from ccfm.logs import setup_rule_logging
from ccfm.preprocess import preprocess_dataset

log = setup_rule_logging(snakemake.log[0])
preprocess_dataset(
    snakemake.input.raw,
    snakemake.output.processed,
    perturbed_genes_tsv=snakemake.output.perturbed_genes,
    **dict(snakemake.params.settings),
)
