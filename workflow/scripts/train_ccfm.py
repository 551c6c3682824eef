"""Rule train_ccfm: train one CCFM variant on one fold (resumes from resume/ when present).

``train.gpus`` > 1 starts that many data-parallel processes with torchrun; otherwise one process.
"""

from pathlib import Path

import torch

from ccfm.logs import setup_rule_logging
from ccfm.model.training import train_distributed, train_from_files

log = setup_rule_logging(snakemake.log[0])
processes = int(snakemake.params.processes)
latent_inputs = (
    {
        "scgpt_dir": str(Path(snakemake.input.scgpt_model).parent),
        "gene_vocab_tsv": snakemake.input.gene_vocab,
        "latent_stats": snakemake.input.latent_stats,
    }
    if snakemake.params.use_latent
    else {}
)
arguments = dict(
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
    extra_labels=list(snakemake.params.extra),
    **latent_inputs,
)
if processes > 1:
    train_distributed(processes, snakemake.log[0], threads_per_process=max(1, snakemake.threads // processes), **arguments)
else:
    torch.set_num_threads(snakemake.threads)
    train_from_files(**arguments)
