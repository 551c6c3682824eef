"""Rule score: cell-eval and the compact metrics of one prediction against the real held-out cells."""

from ccfm.evaluate.celleval import score_prediction, write_score_tables
from ccfm.logs import setup_rule_logging

log = setup_rule_logging(snakemake.log[0])
tables = score_prediction(
    pred_h5ad=snakemake.input.pred,
    real_h5ad=snakemake.input.real,
    control_label=snakemake.params.control_label,
    profile=snakemake.params.profile,
    num_threads=snakemake.threads,
    top_de=snakemake.params.top_de,
    seed=snakemake.params.seed,
    pert_col=snakemake.params.pert_col,
)
write_score_tables(tables, snakemake.output.results, snakemake.output.agg, snakemake.output.compact)
