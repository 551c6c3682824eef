"""Rule preprocess_target: target-context h5ad on exactly the genes of processed.h5ad.

`checks` (`perturbation_type`, `target.min_shared_genes`: the fraction of the source genes the target
must measure) only validate, so the rule passes them as params that do not trigger a rerun.
"""

from ccfm.data.target import TargetSettings, preprocess_target
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
preprocess_target(
    snakemake.input.target_raw,
    snakemake.input.processed,
    snakemake.output.target_processed,
    TargetSettings(**snakemake.params.settings, **snakemake.params.checks),
)
