"""Rule gene_vocab_map: map the dataset's genes to scGPT vocabulary ids."""

from ccfm.logs import setup_rule
from ccfm.scgpt.vocab import gene_vocab_to_files

setup_rule(snakemake.log[0], snakemake.threads)
gene_vocab_to_files(
    snakemake.input.processed,
    snakemake.input.vocab,
    snakemake.output.tsv,
    snakemake.output.coverage,
    snakemake.wildcards.ds,
)
