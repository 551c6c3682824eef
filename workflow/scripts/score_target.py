"""Rules score_target (CCFM) and score_target_state (State): the model from adapted and from unadapted
target controls beside target-control baselines, on the target data."""

from ccfm.adapt.score import TargetScoreFiles, TargetScoreSettings, score_target_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
score_target_to_files(
    TargetScoreFiles(
        snakemake.input.target,
        snakemake.input.processed,
        snakemake.input.pred,
        snakemake.input.pred_unadapted,
        snakemake.output.metrics,
        snakemake.output.summary,
    ),
    TargetScoreSettings(
        n_cells=snakemake.params.cells_per_perturbation,
        seed=snakemake.params.seed,
        method=snakemake.params.method,
        top_de=snakemake.params.top_de,
        cell_eval_profile=snakemake.params.cell_eval_profile,
        num_threads=snakemake.threads,
    ),
)
