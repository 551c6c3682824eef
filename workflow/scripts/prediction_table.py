"""Rule prediction_table: every method's predicted perturbations (scored or not) in one table."""

from ccfm.io.predictions import write_prediction_table
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
write_prediction_table(
    methods=snakemake.params.methods,
    folds=snakemake.params.folds,
    preds=list(snakemake.input.preds),
    splits=dict(zip(map(str, snakemake.params.split_folds), snakemake.input.splits)),
    out_tsv=snakemake.output.table,
)
