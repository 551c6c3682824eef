# CCFM stage: train the cascaded flow model per dataset, fold and variant, then predict the
# fold's held-out perturbations (plus the dataset's `predict:` entries) with two-stage generation.
# Variants: `ccfm` (latent stream on scGPT features, when latent.enabled) and `ccfm_nolatent`
# (the plain scDFM-style model, no scGPT inputs) — same split, so the cascade's value is measured.


rule train_ccfm:
    input:
        # The latent variant also needs the scGPT checkpoint, the vocab map and the fold's stats.
        unpack(
            lambda wc: (
                {
                    "scgpt_model": scgpt_files(wc.ds)["best_model.pt"],
                    "scgpt_vocab": scgpt_files(wc.ds)["vocab.json"],
                    "scgpt_args": scgpt_files(wc.ds)["args.json"],
                    "gene_vocab": f"results/{wc.ds}/gene_vocab.tsv",
                    "latent_stats": f"results/{wc.ds}/fold{wc.fold}/latent_stats.pt",
                }
                if uses_latent(wc)
                else {}
            )
        ),
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        model="results/{ds}/fold{fold}/{variant}/model.pt",
        loss=report(
            "results/{ds}/fold{fold}/{variant}/loss.tsv",
            caption="../report/train_loss_table.rst",
            category="Training",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "model": "{variant}", "table": "loss log"},
        ),
    log:
        "logs/{ds}/fold{fold}/{variant}/train_ccfm.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/{variant}/train_ccfm.tsv"
    conda:
        ENV
    # One thread per training process: the per-step matrices are small, so more intra-op threads
    # gain little on CPU and oversubscribe badly when shared; both variants train side by side.
    threads: lambda wc: training_processes(wc.ds)
    resources:
        # Every process holds its own copy of the processed matrix and model.
        mem_mb=lambda wc, attempt: 16000 * training_processes(wc.ds) * attempt,
        # ~10 steps/s on a GPU at the default size; generous so a cluster job is not cut short.
        runtime=lambda wc: max(30, int(section(wc.ds, "train")["steps"]) // 300),
        gpu=lambda wc: int(section(wc.ds, "train")["gpus"]),
    params:
        model=lambda wc: section(wc.ds, "model"),
        train=lambda wc: section(wc.ds, "train"),
        latent=lambda wc: section(wc.ds, "latent"),
        use_latent=uses_latent,
        perturbation_type=lambda wc: ds_cfg(wc.ds)["perturbation_type"],
        extra_labels=lambda wc: list(ds_cfg(wc.ds)["predict"]),
        # Undeclared on purpose: checkpoints survive a killed job so a rerun resumes.
        resume_dir=lambda wc: f"results/{wc.ds}/fold{wc.fold}/{wc.variant}/resume",
        seed=config["seed"],
        # train.gpus > 1: that many data-parallel processes (torchrun); see ccfm.distributed.
        processes=lambda wc: training_processes(wc.ds),
    script:
        "../scripts/train_ccfm.py"


rule predict:
    input:
        model="results/{ds}/fold{fold}/{variant}/model.pt",
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
        # every gene of the input is written back into the prediction (ccfm.data.gene_fill)
        genes="results/{ds}/genes.tsv",
        raw=lambda wc: raw_input(wc.ds),
    output:
        pred="results/{ds}/fold{fold}/{variant}/pred.h5ad",
        means="results/{ds}/fold{fold}/{variant}/pred_means.csv",
    log:
        "logs/{ds}/fold{fold}/{variant}/predict.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/{variant}/predict.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=120,
        # Generation over all genes is the expensive part of inference: run it where training ran.
        gpu=1,
    params:
        generate=lambda wc: section(wc.ds, "generate"),
        extra_labels=lambda wc: list(ds_cfg(wc.ds)["predict"]),
        seed=config["seed"],
    script:
        "../scripts/predict.py"
