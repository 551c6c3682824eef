"""Rule score: cell-eval and the compact metrics of every method's prediction of one fold."""

from ccfm.evaluate.celleval import score_methods_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
methods = list(snakemake.params.methods)
score_methods_to_files(
    dict(zip(methods, snakemake.input.preds)),
    snakemake.input.real,
    dict(zip(methods, zip(snakemake.output.results, snakemake.output.agg, snakemake.output.compact))),
    processed_h5ad=snakemake.input.processed,
    split_json=snakemake.input.split,
    control_label=snakemake.params.control_label,
    profile=snakemake.params.profile,
    num_threads=snakemake.threads,
    top_de=snakemake.params.top_de,
    seed=snakemake.params.seed,
    pert_col=snakemake.params.pert_col,
)
