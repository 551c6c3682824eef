"""Rule predict_target: target perturbations from shifted and from unshifted target controls."""

from ccfm.adapt.target import predict_target_to_files
from ccfm.logs import setup_rule
from ccfm.model.generation import prepare_generation

setup_rule(snakemake.log[0], snakemake.threads)
generation = prepare_generation(snakemake.input.model, snakemake.params.generate, threads=snakemake.threads)
predict_target_to_files(
    generation,
    snakemake.input.target,
    snakemake.input.shift,
    snakemake.output.pred,
    snakemake.output.means,
    snakemake.output.pred_unadapted,
    snakemake.output.means_unadapted,
    requested=snakemake.params.requested,
    seed=snakemake.params.seed,
)
