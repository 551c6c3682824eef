"""Rule summarize: every method and fold of a dataset in one metric table."""

from ccfm.evaluate.metrics import summarize_score_files
from ccfm.logs import setup_rule_logging

log = setup_rule_logging(snakemake.log[0])
summarize_score_files(
    methods=snakemake.params.methods,
    folds=snakemake.params.folds,
    compact_tsvs=snakemake.input.compact,
    agg_csvs=snakemake.input.agg,
    dataset=snakemake.wildcards.ds,
    out_tsv=snakemake.output.summary,
)
