"""Rule score: cell-eval and the compact metrics of every method's prediction of one fold."""

from ccfm.evaluate.celleval import ScoreOptions, score_methods_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
methods = list(snakemake.params.methods)
score_methods_to_files(
    dict(zip(methods, snakemake.input.preds)),
    snakemake.input.real,
    dict(zip(methods, zip(snakemake.output.results, snakemake.output.agg, snakemake.output.compact))),
    ScoreOptions(
        cell_eval_profile=snakemake.params.cell_eval_profile,
        top_de=snakemake.params.top_de,
        seed=snakemake.params.seed,
        num_threads=snakemake.threads,
        control_label=snakemake.params.control_label,
        pert_col=snakemake.params.pert_col,
    ),
    processed_h5ad=snakemake.input.processed,
    split_json=snakemake.input.split,
)
