"""Rule predict_state: State's predictions of the fold's held-out and `predict:` perturbations.

State predicts the modelled genes; the outputs carry every gene of the input (ccfm.data.gene_fill).
"""

from pathlib import Path

from ccfm.data.gene_fill import predictions_on_all_genes
from ccfm.logs import setup_rule
from ccfm.state.predict import predict_state_to_files

setup_rule(snakemake.log[0], snakemake.threads)
with predictions_on_all_genes(
    snakemake.output.pred,
    snakemake.output.means,
    genes_tsv=snakemake.input.genes,
    processed_h5ad=snakemake.input.processed,
    raw_h5ad=snakemake.input.raw,
    seed=snakemake.params.seed,
) as (pred, means):
    predict_state_to_files(
        Path(snakemake.input.config).parent,
        snakemake.input.split,
        snakemake.input.real,
        pred,
        means,
        extra_labels=snakemake.params.extra_labels,
        cells_per_perturbation=snakemake.params.cells_per_perturbation,
        seed=snakemake.params.seed,
    )
