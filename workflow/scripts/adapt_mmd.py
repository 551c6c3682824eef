"""Rule adapt_mmd: learn the per-gene MMD shift of the target controls and plot its progress."""

from ccfm.adapt.files import adapt_to_files
from ccfm.adapt.shift import AdaptSettings
from ccfm.evaluate.plots import plot_adapt_history
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
adapt_to_files(
    snakemake.input.model,
    snakemake.input.processed,
    snakemake.input.target,
    snakemake.output.shift,
    snakemake.output.mmd,
    snakemake.output.history,
    AdaptSettings.from_mapping(dict(snakemake.params.settings)),
    seed=snakemake.params.seed,
    source_files=list(snakemake.input.source_files),
    source_options=dict(snakemake.params.source_options),
)
plot_adapt_history(
    snakemake.output.history,
    snakemake.output.plot,
    f"{snakemake.wildcards.ds} fold {snakemake.wildcards.fold}: target vs source controls",
)
