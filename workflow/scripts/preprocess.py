"""Rule preprocess: raw h5ad -> results/{ds}/processed.h5ad, the perturbed-gene and the gene status tables.

Everything that changes the outputs is in params (``perturbation_type`` too: it decides how the
perturbed genes are counted in ``perturbed_genes.tsv`` and how ``predict:`` is validated).
"""

from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
preprocess_dataset(
    snakemake.input.raw,
    snakemake.output.processed,
    PreprocessSettings(**snakemake.params.settings),
    perturbed_genes_tsv=snakemake.output.perturbed_genes,
    genes_tsv=snakemake.output.genes,
)
