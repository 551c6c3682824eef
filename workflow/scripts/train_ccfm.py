"""Rule train_ccfm: train one CCFM variant on one fold (resumes from resume/ when present).

``train.gpus`` > 1 starts that many data-parallel processes with torchrun; otherwise one process.
"""

from pathlib import Path

from ccfm.logs import setup_rule
from ccfm.model.training import TrainRequest, train_rule

setup_rule(snakemake.log[0], snakemake.threads)
use_latent = bool(snakemake.params.use_latent)
request = TrainRequest(
    processed_h5ad=snakemake.input.processed,
    split_json=snakemake.input.split,
    out_model=snakemake.output.model,
    out_loss=snakemake.output.loss,
    resume_dir=snakemake.params.resume_dir,
    model_section=dict(snakemake.params.model),
    train_section=dict(snakemake.params.train),
    latent_section=dict(snakemake.params.latent),
    seed=snakemake.params.seed,
    use_latent=snakemake.params.use_latent,
    perturbation_type=snakemake.params.perturbation_type,
    extra_labels=list(snakemake.params.extra_labels),
    # scgpt_model is the checkpoint's best_model.pt: its directory is the scGPT model of a latent run
    scgpt_dir=str(Path(snakemake.input.scgpt_model).parent) if use_latent else None,
    gene_vocab_tsv=snakemake.input.gene_vocab if use_latent else None,
    latent_stats=snakemake.input.latent_stats if use_latent else None,
)
train_rule(request, int(snakemake.params.processes), int(snakemake.threads), snakemake.log[0])
