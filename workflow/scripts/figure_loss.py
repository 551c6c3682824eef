"""Rule figure_loss: training loss curves of the CCFM variants of one fold."""

from ccfm.evaluate.plots import loss_curves_figure
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
loss_curves_figure(
    list(snakemake.input.losses),
    snakemake.output.png,
    title=f"{snakemake.wildcards.ds} fold {snakemake.wildcards.fold}: CCFM training",
)
