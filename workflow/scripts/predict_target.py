"""Rules predict_target (CCFM) and predict_target_state (State): target perturbations from shifted and
from unshifted target controls."""

from ccfm.adapt.adaptable import ModelSpec, load_adaptable
from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
predict_target_to_files(
    load_adaptable(ModelSpec(snakemake.params.method, snakemake.params.model, dict(snakemake.params.generate))),
    snakemake.input.target,
    snakemake.input.shift,
    TargetPredictionFiles(
        snakemake.output.pred, snakemake.output.means, snakemake.output.pred_unadapted, snakemake.output.means_unadapted
    ),
    requested=snakemake.params.requested,
    seed=snakemake.params.seed,
)
