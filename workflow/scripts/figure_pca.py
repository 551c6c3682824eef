"""Rule figure_pca: each method's predicted vs real cells in the PCA of the real cells."""

from ccfm.evaluate.plots import prediction_pca_figures
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
methods = list(snakemake.params.methods)
prediction_pca_figures(
    dict(zip(methods, snakemake.input.preds)),
    snakemake.input.real,
    dict(zip(methods, snakemake.output.png)),
    seed=snakemake.params.seed,
    control_label=snakemake.params.control_label,
)
