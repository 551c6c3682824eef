"""Rule predict_target_state: State's target predictions from shifted and unshifted target controls."""

from ccfm.logs import setup_rule
from ccfm.state.adapt import predict_target_state_to_files

setup_rule(snakemake.log[0], snakemake.threads)
predict_target_state_to_files(
    snakemake.params.run_dir,
    snakemake.input.target,
    snakemake.input.shift,
    snakemake.output.pred,
    snakemake.output.means,
    snakemake.output.pred_unadapted,
    snakemake.output.means_unadapted,
    requested=snakemake.params.requested,
    cells_per_perturbation=snakemake.params.cells_per_perturbation,
    seed=snakemake.params.seed,
)
