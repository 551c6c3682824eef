"""Rule predict_state: State's predictions of the fold's held-out and `predict:` perturbations."""

from pathlib import Path

import torch

from ccfm.logs import setup_rule_logging
from ccfm.state.predict import predict_state_to_files

log = setup_rule_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
predict_state_to_files(
    Path(snakemake.input.config).parent,
    snakemake.input.split,
    snakemake.input.real,
    snakemake.output.pred,
    snakemake.output.means,
    extra_predict=snakemake.params.extra,
    cells_per_perturbation=snakemake.params.cells_per_perturbation,
    seed=snakemake.params.seed,
)
