"""Rule adapt_state: learn the per-gene MMD shift of the target controls through State's basal encoder."""

from ccfm.adapt.shift import AdaptSettings
from ccfm.evaluate.plots import plot_adapt_history
from ccfm.logs import setup_rule
from ccfm.state.adapt import adapt_state_to_files

setup_rule(snakemake.log[0], snakemake.threads)
adapt_state_to_files(
    snakemake.params.run_dir,
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
    f"{snakemake.wildcards.ds} fold {snakemake.wildcards.fold}: State basal encoder, target vs source controls",
)
