"""Rule figure_gene_vocab: scGPT vocabulary coverage of a dataset's genes."""

from ccfm.evaluate.plots import gene_vocab_figure
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
gene_vocab_figure(snakemake.input.vocab, snakemake.output.png, snakemake.wildcards.ds)
