"""Rule baseline: predict a fold's held-out perturbations with one baseline method.

The baseline predicts the modelled genes; the outputs carry every gene of the input (ccfm.data.gene_fill).
"""

from ccfm.data.gene_fill import predictions_on_all_genes
from ccfm.evaluate.baselines import run_baseline
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
        method=snakemake.wildcards.method,
        processed_h5ad=snakemake.input.processed,
        split_json=snakemake.input.split,
        real_h5ad=snakemake.input.real,
        out_h5ad=pred,
        out_means_csv=means,
        extra_predict=snakemake.params.predict,
        cells_per_perturbation=snakemake.params.cells_per_perturbation,
        seed=snakemake.params.seed,
        chunk_size=snakemake.params.chunk_size,
    )
