# scGPT stage: checkpoints (built `tiny`, downloaded `whole-human`), gene -> vocab mapping, and
# the running statistics of frozen scGPT features over each fold's training cells.
# Fixed output paths for the two named checkpoints keep the rules unambiguous; any other
# checkpoint directory named in the config is used in place (files put there by the user).

from ccfm.config import scgpt_settings


rule scgpt_build_tiny:
    output:
        model="resources/scgpt/tiny/best_model.pt",
        vocab="resources/scgpt/tiny/vocab.json",
        args="resources/scgpt/tiny/args.json",
    log:
        "logs/scgpt/build_tiny.log",
    benchmark:
        "results/benchmarks/scgpt/build_tiny.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    params:
        seed=config["seed"],
        sizes=config.get("scgpt", {}).get("tiny", {}),
    script:
        "../scripts/scgpt_build_tiny.py"


rule scgpt_download:
    output:
        model="resources/scgpt/whole-human/best_model.pt",
        vocab="resources/scgpt/whole-human/vocab.json",
        args="resources/scgpt/whole-human/args.json",
    log:
        "logs/scgpt/download_whole_human.log",
    benchmark:
        "results/benchmarks/scgpt/download_whole_human.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=60,
    params:
        # The Drive folder, the mirror and the sha256 digests (the `scgpt` block over the schema's
        # defaults), derived from `output` so that Snakemake does not track them: as plain params,
        # pinning a digest or adding a mirror would delete and re-download the 200 MB checkpoint
        # and retrain every model built on it.
        settings=lambda wc, output: scgpt_settings(config),
    script:
        "../scripts/scgpt_download.py"


rule gene_vocab_map:
    input:
        processed="results/{ds}/processed.h5ad",
        vocab=lambda wc: scgpt_files(wc.ds)["vocab.json"],
    output:
        tsv=report(
            "results/{ds}/gene_vocab.tsv",
            caption="../report/gene_vocab.rst",
            category="scGPT",
            labels={"dataset": "{ds}", "table": "gene to vocab mapping"},
        ),
        coverage=report(
            "results/{ds}/gene_vocab_coverage.tsv",
            caption="../report/gene_vocab_coverage.rst",
            category="scGPT",
            labels={"dataset": "{ds}", "table": "vocab coverage"},
        ),
    log:
        "logs/{ds}/gene_vocab_map.log",
    benchmark:
        "results/{ds}/benchmarks/gene_vocab_map.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    script:
        "../scripts/gene_vocab_map.py"


rule calibrate_latent:
    input:
        processed="results/{ds}/processed.h5ad",
        model=lambda wc: scgpt_files(wc.ds)["best_model.pt"],
        vocab=lambda wc: scgpt_files(wc.ds)["vocab.json"],
        args=lambda wc: scgpt_files(wc.ds)["args.json"],
        split="results/{ds}/splits/fold{fold}.json",
        gene_vocab="results/{ds}/gene_vocab.tsv",
    output:
        stats="results/{ds}/fold{fold}/latent_stats.pt",
    log:
        "logs/{ds}/fold{fold}/calibrate_latent.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/calibrate_latent.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=240,
        # Runs frozen scGPT on CUDA when a GPU is visible: one GPU, so that under profiles/gpu
        # it never shares the card with a training job.
        gpu=1,
    params:
        latent=lambda wc: section(wc.ds, "latent"),
        seed=config["seed"],
    script:
        "../scripts/calibrate_latent.py"
