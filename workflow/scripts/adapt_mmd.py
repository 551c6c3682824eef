"""Rules adapt_mmd (CCFM) and adapt_state (State): learn the per-gene MMD shift of the target controls
through the model's control encoder and plot its progress."""

from ccfm.adapt.adaptable import ModelSpec, load_adaptable
from ccfm.adapt.files import AdaptInputs, ShiftFiles, adapt_to_files
from ccfm.adapt.shift import AdaptSettings
from ccfm.evaluate.plots import plot_adapt_history
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
adapt_to_files(
    load_adaptable(ModelSpec(snakemake.params.method, snakemake.params.model)),
    AdaptInputs(
        snakemake.input.processed,
        snakemake.input.target,
        source_files=list(snakemake.input.source_files),
        source_options=dict(snakemake.params.source_options),
    ),
    ShiftFiles(snakemake.output.shift, snakemake.output.mmd, snakemake.output.history),
    AdaptSettings.from_mapping(dict(snakemake.params.settings)),
    seed=snakemake.params.seed,
)
plot_adapt_history(snakemake.output.history, snakemake.output.plot, snakemake.params.title)
