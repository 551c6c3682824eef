# Data stage: obtain raw data (simulate the demo, or download with checksum and resume),
# preprocess it (normalize_total + log1p, HVGs + perturbed genes, canonical labels), bring the
# target context onto the same genes, and split conditions into folds.
#
# resources/data/{ds}/raw.h5ad has two producers (simulation, download); each rule only matches
# the datasets whose config `source` says so, which keeps the DAG unambiguous.


# Dataset names per source, as regex alternations ("(?!x)x" never matches: no such dataset).
SIMULATED = "|".join(ds for ds, spec in config["datasets"].items() if spec["source"] == "simulate") or "(?!x)x"
DOWNLOADED = "|".join(ds for ds, spec in config["datasets"].items() if spec["source"] == "url") or "(?!x)x"
# A simulated dataset's target comes from the simulation; only other datasets download theirs.
TARGET_DOWNLOADED = "|".join(
    ds
    for ds, spec in config["datasets"].items()
    if spec["source"] != "simulate" and spec.get("target", {}).get("source") == "url"
) or "(?!x)x"
WITH_TARGET = "|".join(ds for ds, spec in config["datasets"].items() if "target" in spec) or "(?!x)x"
LABEL_KEYS = ("perturbation_column", "control_label", "combo_separator", "input_scale")
# Guide indices ("ZAP70_1") are stripped from gene labels; drug names may be numbers: keep them.
GUIDE_TOKEN = {"gene": r"^\d+$", "drug": None}


rule simulate_demo:
    output:
        raw="resources/data/{ds}/raw.h5ad",
        target_raw="resources/data/{ds}/target_raw.h5ad",
        ground_truth="resources/data/{ds}/ground_truth.npz",
    wildcard_constraints:
        ds=SIMULATED,
    params:
        seed=config["seed"],
        sizes=lambda wc: config["datasets"][wc.ds].get("simulate", {}),
    benchmark:
        "results/{ds}/benchmarks/simulate_demo.tsv"
    log:
        "logs/simulate_demo/{ds}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/simulate_demo.py"


rule download_dataset:
    output:
        raw="resources/data/{ds}/raw.h5ad",
    wildcard_constraints:
        ds=DOWNLOADED,
    params:
        # Only the source is a param. md5/sha256/allow_unverified are read from the config by the
        # script: as params, pinning a checksum on a downloaded file would rerun the download and
        # everything after it (Snakemake deletes the outputs of a job it reruns).
        url=lambda wc: config["datasets"][wc.ds].get("url"),
        block="dataset",
    benchmark:
        "results/{ds}/benchmarks/download_dataset.tsv"
    log:
        "logs/download_dataset/{ds}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=240,
    conda:
        ENV
    script:
        "../scripts/download_dataset.py"


use rule download_dataset as download_target with:
    output:
        raw="resources/data/{ds}/target_raw.h5ad",
    wildcard_constraints:
        ds=TARGET_DOWNLOADED,
    params:
        url=lambda wc: config["datasets"][wc.ds]["target"].get("url"),
        block="target",
    benchmark:
        "results/{ds}/benchmarks/download_target.tsv"
    log:
        "logs/download_target/{ds}.log",


rule preprocess:
    input:
        raw=lambda wc: raw_input(wc.ds),
    output:
        processed="results/{ds}/processed.h5ad",
        # measured / unmeasured-but-perturbed / unmeasured-and-unseen perturbed genes
        perturbed_genes=report(
            "results/{ds}/perturbed_genes.tsv",
            caption="../report/perturbed_genes.rst",
            category="Data",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "file": "perturbed genes"},
        ),
    params:
        settings=lambda wc: {
            "dataset": wc.ds,
            **{k: ds_cfg(wc.ds)[k] for k in LABEL_KEYS},
            "perturbation_type": ds_cfg(wc.ds)["perturbation_type"],
            "guide_token_pattern": GUIDE_TOKEN[ds_cfg(wc.ds)["perturbation_type"]],
            **{k: section(wc.ds, "preprocess")[k] for k in ("n_top_genes", "target_sum", "chunk_size")},
            # validated against the data's genes (drugs: its drugs) before any work; genes are kept
            "predict": list(ds_cfg(wc.ds).get("predict", [])),
        },
    benchmark:
        "results/{ds}/benchmarks/preprocess.tsv"
    log:
        "logs/preprocess/{ds}.log",
    threads: 1
    resources:
        # Streaming passes keep memory flat in the cells; a retry after an OOM kill gets more.
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    conda:
        ENV
    script:
        "../scripts/preprocess.py"


rule preprocess_target:
    input:
        target_raw=lambda wc: target_raw_input(wc.ds),
        processed="results/{ds}/processed.h5ad",
    output:
        target_processed="results/{ds}/target_processed.h5ad",
    wildcard_constraints:
        ds=WITH_TARGET,
    params:
        settings=lambda wc: {
            "dataset": wc.ds,
            **{k: ds_cfg(wc.ds)[k] for k in LABEL_KEYS},
            # the target context may name its own label column and control label
            **{k: v for k, v in config["datasets"][wc.ds]["target"].items() if k in LABEL_KEYS},
            # the target's own scale setting (not the source's): detected unless given
            "input_scale": config["datasets"][wc.ds]["target"].get("input_scale", "auto"),
            "guide_token_pattern": GUIDE_TOKEN[ds_cfg(wc.ds)["perturbation_type"]],
            **{k: section(wc.ds, "preprocess")[k] for k in ("target_sum", "chunk_size")},
            "predict": list(config["datasets"][wc.ds]["target"].get("predict", [])),
        },
    benchmark:
        "results/{ds}/benchmarks/preprocess_target.tsv"
    log:
        "logs/preprocess_target/{ds}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    conda:
        ENV
    script:
        "../scripts/preprocess_target.py"


rule split:
    input:
        processed="results/{ds}/processed.h5ad",
    output:
        split=report(
            "results/{ds}/splits/fold{fold}.json",
            caption="../report/split.rst",
            category="Data",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "file": "split"},
        ),
        real="results/{ds}/fold{fold}/real.h5ad",
    params:
        seed=config["seed"],
        # gene datasets: conditions whose unmeasured genes would lose all training cells always train
        perturbation_type=lambda wc: ds_cfg(wc.ds)["perturbation_type"],
        heldout_fraction=lambda wc: section(wc.ds, "split")["heldout_fraction"],
        n_folds=lambda wc: section(wc.ds, "split")["n_folds"],
        min_cells=lambda wc: section(wc.ds, "split")["min_cells_per_perturbation"],
        chunk_size=lambda wc: section(wc.ds, "preprocess")["chunk_size"],
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/split.tsv"
    log:
        "logs/split/{ds}_fold{fold}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/split.py"
