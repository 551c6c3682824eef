"""Rule figure_delta_scatter: predicted vs observed deltas for a few held-out perturbations."""

from ccfm.evaluate.plots import delta_scatter_figure
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
delta_scatter_figure(
    snakemake.input.real,
    list(snakemake.input.means),
    snakemake.output.png,
    n_perturbations=snakemake.params.n_perturbations,
    control_label=snakemake.params.control_label,
)
