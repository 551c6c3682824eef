"""Rule split: fold JSON (train/test conditions) and the fold's real.h5ad (held-out + controls)."""

from ccfm.logs import setup_rule_logging
from ccfm.splits import split_for_processed, write_real, write_split

log = setup_rule_logging(snakemake.log[0])
split = split_for_processed(
    snakemake.input.processed,
    fold=int(snakemake.wildcards.fold),
    seed=int(snakemake.params.seed),
    heldout_fraction=float(snakemake.params.heldout_fraction),
    n_folds=int(snakemake.params.n_folds),
    perturbation_type=str(snakemake.params.perturbation_type),
)
write_real(snakemake.input.processed, split, snakemake.output.real, chunk_size=int(snakemake.params.chunk_size))
write_split(split, snakemake.output.split)
