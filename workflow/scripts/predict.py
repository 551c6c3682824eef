"""Rule predict: two-stage cascaded generation for a fold's held-out and `predict:` perturbations."""

from ccfm.logs import setup_rule_logging
from ccfm.model.generation import predict_to_files, prepare_generation

log = setup_rule_logging(snakemake.log[0])
generation = prepare_generation(snakemake.input.model, snakemake.params.generate, threads=snakemake.threads)
predict_to_files(
    generation,
    snakemake.input.processed,
    snakemake.input.split,
    snakemake.params.extra,
    snakemake.output.pred,
    snakemake.output.means,
    seed=snakemake.params.seed,
)
