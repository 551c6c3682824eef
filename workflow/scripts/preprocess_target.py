"""Rule preprocess_target: target-context h5ad on exactly the genes of processed.h5ad.

Validation-only settings (`perturbation_type`, `target.min_shared_genes`: the fraction of the
source genes the target must measure) are read from the config, not params, as in preprocess.
"""

from ccfm.config import dataset_config
from ccfm.data.preprocess import preprocess_target
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
dataset = dataset_config(snakemake.config, snakemake.wildcards.ds)
preprocess_target(
    snakemake.input.target_raw,
    snakemake.input.processed,
    snakemake.output.target_processed,
    **dict(snakemake.params.settings),
    perturbation_type=dataset["perturbation_type"],
    min_shared_genes=float(dataset["target"]["min_shared_genes"]),
)
