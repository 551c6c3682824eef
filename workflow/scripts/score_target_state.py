"""Rule score_target_state: adapted vs unadapted State vs target-control baselines on the target data."""

from ccfm.logs import setup_rule
from ccfm.state.adapt import score_target_state_to_files

setup_rule(snakemake.log[0], snakemake.threads)
score_target_state_to_files(
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
