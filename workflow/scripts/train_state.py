"""Rule train_state: train Arc's State transition model on the fold's training cells (state tx train)."""

from pathlib import Path

from ccfm.logs import setup_rule
from ccfm.state.train import StateTrainFiles, train_state_to_files

setup_rule(snakemake.log[0], snakemake.threads)
train_state_to_files(
    StateTrainFiles(
        snakemake.input.processed, snakemake.input.split, Path(snakemake.output.config).parent, snakemake.output.loss
    ),
    snakemake.params.settings,
    seed=snakemake.params.seed,
    threads=snakemake.threads,
    log_path=snakemake.log[0],
)
