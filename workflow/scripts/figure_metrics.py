"""Rule figure_metrics: metric comparison of all methods for one dataset."""

from ccfm.evaluate.plots import metric_comparison_figure
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
metric_comparison_figure(snakemake.input.summary, snakemake.output.png, snakemake.wildcards.ds)
