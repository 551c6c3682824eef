"""Rule figure_loss: training loss curves of the CCFM variants of one fold."""

from ccfm.evaluate.plots import loss_curves_figure
from ccfm.logs import setup_rule_logging

log = setup_rule_logging(snakemake.log[0])
loss_curves_figure(
    list(snakemake.input.losses),
    snakemake.output.png,
    title=f"{snakemake.wildcards.ds} fold {snakemake.wildcards.fold}: CCFM training",
)
