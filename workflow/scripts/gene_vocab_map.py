"""Rule gene_vocab_map: map the dataset's genes to scGPT vocabulary ids."""

from ccfm.io.h5ad import read_var
from ccfm.logs import setup_rule_logging
from ccfm.scgpt.checkpoint import read_vocab
from ccfm.scgpt.vocab import coverage_summary, map_genes, write_coverage_table, write_gene_vocab

log = setup_rule_logging(snakemake.log[0])
var = read_var(snakemake.input.processed)
mapping = map_genes(var.index.astype(str), read_vocab(snakemake.input.vocab), var)
write_gene_vocab(mapping, snakemake.output.tsv)
write_coverage_table(mapping, snakemake.output.coverage, snakemake.wildcards.ds)
log.info("%s: %s", snakemake.wildcards.ds, coverage_summary(mapping))
