"""Rule gene_vocab_map: map the dataset's genes to scGPT vocabulary ids."""

from ccfm.logs import setup_rule_logging
from ccfm.scgpt.vocab import gene_vocab_to_files

log = setup_rule_logging(snakemake.log[0])
gene_vocab_to_files(
    snakemake.input.processed,
    snakemake.input.vocab,
    snakemake.output.tsv,
    snakemake.output.coverage,
    snakemake.wildcards.ds,
)
