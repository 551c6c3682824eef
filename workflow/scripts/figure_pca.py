"""Rule figure_pca: predicted vs real cells of one method in the PCA of the real cells."""

from ccfm.evaluate.plots import prediction_pca_figure
from ccfm.logs import setup_rule_logging

log = setup_rule_logging(snakemake.log[0])
prediction_pca_figure(
    snakemake.input.pred,
    snakemake.input.real,
    snakemake.output.png,
    method=snakemake.wildcards.method,
    seed=snakemake.params.seed,
    control_label=snakemake.params.control_label,
)
