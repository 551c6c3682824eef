"""Rule baseline: predict a fold's held-out perturbations with one baseline method.

The baseline predicts the modelled genes; the outputs carry every gene of the input (ccfm.data.gene_fill).
"""

from ccfm.data.gene_fill import predictions_on_all_genes
from ccfm.evaluate.baselines import BaselineOptions, run_baseline
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
with predictions_on_all_genes(
    snakemake.output.pred,
    snakemake.output.means,
    genes_tsv=snakemake.input.genes,
    processed_h5ad=snakemake.input.processed,
    raw_h5ad=snakemake.input.raw,
    seed=snakemake.params.seed,
) as (pred, means):
    run_baseline(
        snakemake.wildcards.method,
        snakemake.input.processed,
        snakemake.input.split,
        snakemake.input.real,
        pred,
        means,
        BaselineOptions(
            extra_labels=snakemake.params.extra_labels,
            cells_per_perturbation=snakemake.params.cells_per_perturbation,
            seed=snakemake.params.seed,
            chunk_size=snakemake.params.chunk_size,
        ),
    )
