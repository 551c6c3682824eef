"""Rule baseline: predict a fold's held-out perturbations with one baseline method."""

from ccfm.evaluate.baselines import run_baseline
from ccfm.logs import setup_rule_logging

log = setup_rule_logging(snakemake.log[0])
run_baseline(
    method=snakemake.wildcards.method,
    processed_h5ad=snakemake.input.processed,
    split_json=snakemake.input.split,
    real_h5ad=snakemake.input.real,
    out_h5ad=snakemake.output.pred,
    out_means_csv=snakemake.output.means,
    extra_predict=snakemake.params.predict,
    cells_per_perturbation=snakemake.params.cells_per_perturbation,
    seed=snakemake.params.seed,
    chunk_size=snakemake.params.chunk_size,
)
