"""Rule preprocess: raw h5ad -> results/{ds}/processed.h5ad.

`perturbation_type` only changes what is validated (drug `predict:` entries are checked against
the drugs, numeric labels are allowed); it is read from the config rather than declared as a
param, so adding a validation setting never makes Snakemake redo existing results. Everything
that changes the output is in params.
"""

from ccfm.config import dataset_config
from ccfm.logs import setup_rule_logging
from ccfm.preprocess import preprocess_dataset

log = setup_rule_logging(snakemake.log[0])
preprocess_dataset(
    snakemake.input.raw,
    snakemake.output.processed,
    **dict(snakemake.params.settings),
    perturbation_type=dataset_config(snakemake.config, snakemake.wildcards.ds)["perturbation_type"],
)
