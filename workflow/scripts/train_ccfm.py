"""Rule train_ccfm: train one CCFM variant on one fold (resumes from resume/ when present).

``train.gpus`` > 1 starts that many data-parallel processes with torchrun; otherwise one process.
"""

from ccfm.logs import setup_rule_logging
from ccfm.model.training import train_rule

log = setup_rule_logging(snakemake.log[0])
use_latent = bool(snakemake.params.use_latent)
train_rule(
    int(snakemake.params.processes),
    int(snakemake.threads),
    snakemake.log[0],
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
    **(
        {
            "scgpt_model": snakemake.input.scgpt_model,
            "gene_vocab_tsv": snakemake.input.gene_vocab,
            "latent_stats": snakemake.input.latent_stats,
        }
        if use_latent
        else {}
    ),
)
