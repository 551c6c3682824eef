"""Rule predict: two-stage cascaded generation for a fold's held-out and `predict:` perturbations.

The model predicts its genes; the outputs carry every gene of the input (ccfm.data.gene_fill).
"""

from ccfm.data.gene_fill import predictions_on_all_genes
from ccfm.logs import setup_rule
from ccfm.model.generation import predict_to_files, prepare_generation

setup_rule(snakemake.log[0], snakemake.threads)
generation = prepare_generation(snakemake.input.model, snakemake.params.generate, threads=snakemake.threads)
with predictions_on_all_genes(
    snakemake.output.pred,
    snakemake.output.means,
    genes_tsv=snakemake.input.genes,
    processed_h5ad=snakemake.input.processed,
    raw_h5ad=snakemake.input.raw,
    seed=snakemake.params.seed,  # the generation seed: filled genes come from each cell's source control cell
) as (pred, means):
    predict_to_files(
        generation,
        snakemake.input.processed,
        snakemake.input.split,
        snakemake.params.extra_labels,
        pred,
        means,
        seed=snakemake.params.seed,
    )
