"""Rule split: fold JSON (train/test conditions) and the fold's real.h5ad (held-out + controls).

real.h5ad carries every gene of the input (genes.tsv; the raw input supplies the genes left out of
modelling), as the prediction files do. With too few held-out perturbations for score.profile the
split file records the profile the fold is scored with instead.

Before anything is written the fold is checked against what later rules need (`params.checks`: enough
held-out perturbations for the cell-eval profile, a batch size the training cells can fill). The
rule derives those params so that changing them does not redo the split and every model trained on
it; train_ccfm and score check them again when they run.
"""

from ccfm.data.splits import FoldChecks, SplitSettings, split_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
params = snakemake.params
split_to_files(
    snakemake.input.processed,
    snakemake.output.split,
    snakemake.output.real,
    fold=int(snakemake.wildcards.fold),
    settings=SplitSettings(
        seed=int(params.seed),
        heldout_fraction=float(params.heldout_fraction),
        n_folds=int(params.n_folds),
        min_cells_per_perturbation=int(params.min_cells),
        perturbation_type=str(params.perturbation_type),
        chunk_size=int(params.chunk_size),
    ),
    checks=FoldChecks(**params.checks),
    genes_tsv=snakemake.input.genes,
    raw=snakemake.input.raw,
)
