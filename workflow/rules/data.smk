# Data stage: obtain raw data (simulate the demo, or download with checksum and resume),
# preprocess it (normalize_total + log1p, HVGs + perturbed genes, canonical labels), bring the
# target context onto the same genes, and split conditions into folds.
#
# resources/data/{ds}/raw.h5ad has two producers (simulation, download); each rule only matches
# the datasets whose config `source` says so, which keeps the DAG unambiguous.
#
# Settings that only verify or validate are derived params (see common.smk: download_checks).


rule simulate_demo:
    output:
        raw="resources/data/{ds}/raw.h5ad",
        target_raw="resources/data/{ds}/target_raw.h5ad",
        ground_truth="resources/data/{ds}/ground_truth.npz",
    log:
        "logs/simulate_demo/{ds}.log",
    benchmark:
        "results/{ds}/benchmarks/simulate_demo.tsv"
    wildcard_constraints:
        ds=datasets_matching(lambda spec: spec["source"] == "simulate"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    params:
        seed=config["seed"],
        sizes=lambda wc: config["datasets"][wc.ds].get("simulate", {}),
    script:
        "../scripts/simulate_demo.py"


rule download_dataset:
    output:
        raw="resources/data/{ds}/raw.h5ad",
    log:
        "logs/download_dataset/{ds}.log",
    benchmark:
        "results/{ds}/benchmarks/download_dataset.tsv"
    wildcard_constraints:
        ds=datasets_matching(lambda spec: spec["source"] == "url"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=240,
    params:
        # Only the source triggers a rerun. The checksums are derived params (see the top): as
        # plain params, pinning one on a downloaded file would rerun the download and everything
        # after it (Snakemake deletes the outputs of a job it reruns).
        url=lambda wc: config["datasets"][wc.ds].get("url"),
        block="dataset",
        verify=lambda wc, output: download_checks(wc.ds),
    script:
        "../scripts/download_dataset.py"


use rule download_dataset as download_target with:
    output:
        raw="resources/data/{ds}/target_raw.h5ad",
    log:
        "logs/download_target/{ds}.log",
    benchmark:
        "results/{ds}/benchmarks/download_target.tsv"
    wildcard_constraints:
        ds=datasets_matching(target_is_downloaded),
    params:
        url=lambda wc: config["datasets"][wc.ds]["target"].get("url"),
        block="target",
        verify=lambda wc, output: download_checks(wc.ds),


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
        # every input gene: modelled, never expressed or not selected (what prediction files write back)
        genes=report(
            "results/{ds}/genes.tsv",
            caption="../report/genes.rst",
            category="Data",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "file": "genes"},
        ),
    log:
        "logs/preprocess/{ds}.log",
    benchmark:
        "results/{ds}/benchmarks/preprocess.tsv"
    conda:
        ENV
    threads: 1
    resources:
        # Streaming passes keep memory flat in the cells; a retry after an OOM kill gets more.
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    params:
        settings=lambda wc: preprocess_settings(wc.ds),
    script:
        "../scripts/preprocess.py"


rule preprocess_target:
    input:
        target_raw=lambda wc: target_raw_input(wc.ds),
        processed="results/{ds}/processed.h5ad",
    output:
        target_processed="results/{ds}/target_processed.h5ad",
    log:
        "logs/preprocess_target/{ds}.log",
    benchmark:
        "results/{ds}/benchmarks/preprocess_target.tsv"
    wildcard_constraints:
        ds=datasets_matching(lambda spec: "target" in spec),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    params:
        settings=lambda wc: preprocess_target_settings(wc.ds),
        checks=lambda wc, input: target_checks(wc.ds),
    script:
        "../scripts/preprocess_target.py"


rule split:
    input:
        processed="results/{ds}/processed.h5ad",
        genes="results/{ds}/genes.tsv",
        raw=lambda wc: raw_input(wc.ds),
    output:
        split=report(
            "results/{ds}/splits/fold{fold}.json",
            caption="../report/split.rst",
            category="Data",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "file": "split"},
        ),
        real="results/{ds}/fold{fold}/real.h5ad",
    log:
        "logs/split/{ds}_fold{fold}.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/split.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    params:
        seed=config["seed"],
        # gene datasets: conditions whose unmeasured genes would lose all training cells always train
        perturbation_type=lambda wc: ds_cfg(wc.ds)["perturbation_type"],
        heldout_fraction=lambda wc: section(wc.ds, "split")["heldout_fraction"],
        n_folds=lambda wc: section(wc.ds, "split")["n_folds"],
        min_cells=lambda wc: section(wc.ds, "split")["min_cells_per_perturbation"],
        chunk_size=lambda wc: section(wc.ds, "preprocess")["chunk_size"],
        # checked, not used to split: a change reruns neither the split nor the models trained on it
        checks=lambda wc, input: fold_checks(wc.ds),
    script:
        "../scripts/split.py"
