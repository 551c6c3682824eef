"""Rule score_target: adapted vs unadapted CCFM vs target-control baselines on the target data."""

from ccfm.adapt.score import score_target_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
score_target_to_files(
    snakemake.input.target,
    snakemake.input.processed,
    snakemake.input.pred,
    snakemake.input.pred_unadapted,
    snakemake.output.metrics,
    snakemake.output.summary,
    n_cells=snakemake.params.cells_per_perturbation,
    seed=snakemake.params.seed,
    top_de=snakemake.params.score["top_de"],
    cell_eval_profile=snakemake.params.score["profile"],
    num_threads=snakemake.threads,
)
