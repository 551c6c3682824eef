"""Rule split: fold JSON (train/test conditions) and the fold's real.h5ad (held-out + controls).

real.h5ad carries every gene of the input (genes.tsv; the raw input supplies the genes left out of
modelling), as the prediction files do. With too few held-out perturbations for score.profile the
split file records the profile the fold is scored with instead.

Before anything is written the fold is checked against what later rules need (enough held-out
perturbations for the cell-eval profile, a batch size the training cells can fill). Those two
settings are read from the config, not declared as params: changing them must not redo the
split and every model trained on it; train_ccfm and score check them again when they run.
"""

from ccfm.config import dataset_section
from ccfm.data.splits import split_to_files
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
dataset = snakemake.wildcards.ds
split_to_files(
    snakemake.input.processed,
    snakemake.output.split,
    snakemake.output.real,
    fold=int(snakemake.wildcards.fold),
    seed=int(snakemake.params.seed),
    heldout_fraction=float(snakemake.params.heldout_fraction),
    n_folds=int(snakemake.params.n_folds),
    min_cells_per_perturbation=int(snakemake.params.min_cells),
    perturbation_type=str(snakemake.params.perturbation_type),
    score_profile=dataset_section(snakemake.config, dataset, "score")["profile"],
    batch_size=int(dataset_section(snakemake.config, dataset, "train")["batch_size"]),
    chunk_size=int(snakemake.params.chunk_size),
    genes_tsv=snakemake.input.genes,
    raw=snakemake.input.raw,
)
