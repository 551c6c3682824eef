"""Rule summarize: every method and fold of a dataset in one metric table."""

from ccfm.evaluate.metrics import summarize_score_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
summarize_score_files(
    methods=snakemake.params.methods,
    folds=snakemake.params.folds,
    compact_tsvs=snakemake.input.compact,
    agg_csvs=snakemake.input.agg,
    dataset=snakemake.wildcards.ds,
    out_tsv=snakemake.output.summary,
)
