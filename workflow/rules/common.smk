# Config validation and input functions shared by all rules.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from ccfm.config import dataset_config, dataset_section, validate_config

validate_config(config)

DATASETS = list(config["datasets"])
BASELINES = ["nochange", "additive", "meanpert"]
MODEL_VARIANTS = ["ccfm", "ccfm_nolatent"]
METHODS = BASELINES + MODEL_VARIANTS
ENV = "../envs/ccfm.yaml"


wildcard_constraints:
    ds="|".join(DATASETS),
    fold=r"\d+",
    method="|".join(METHODS),
    variant="|".join(MODEL_VARIANTS),


def method_files(wc, name):
    """One file per scored method of a fold, in METHODS order: results/{ds}/fold{k}/{method}/{name}."""
    return [f"results/{wc.ds}/fold{wc.fold}/{method}/{name}" for method in METHODS]


def ds_cfg(ds):
    return dataset_config(config, ds)


def section(ds, name):
    return dataset_section(config, ds, name)


def training_processes(ds):
    """Processes of one train_ccfm job: train.gpus when above 1 (data parallel), else 1."""
    return max(1, int(section(ds, "train")["gpus"]))


def folds(ds):
    return section(ds, "split")["folds"]


def has_target(ds):
    return "target" in config["datasets"][ds]


def raw_input(ds):
    """Raw h5ad of a dataset: the user's file in place, or the pipeline's download/simulation."""
    spec = config["datasets"][ds]
    if spec["source"] == "path":
        return spec["path"]
    return f"resources/data/{ds}/raw.h5ad"


def target_raw_input(ds):
    spec = config["datasets"][ds]["target"]
    if spec["source"] == "path":
        return spec["path"]
    return f"resources/data/{ds}/target_raw.h5ad"


def scgpt_dir(ds):
    """Checkpoint directory: a model name under resources/scgpt/, or a user-given directory."""
    model = ds_cfg(ds)["scgpt_model"]
    if "/" in model:
        return model
    return f"resources/scgpt/{model}"


def scgpt_files(ds):
    base = scgpt_dir(ds)
    return {name: f"{base}/{name}" for name in ("best_model.pt", "vocab.json", "args.json")}


def adapt_targets(ds):
    """Adaptation outputs, for datasets with a `target:` context."""
    if not has_target(ds):
        return []
    names = (
        "shift.safetensors",
        "mmd.tsv",
        "history.png",
        "target_pred.h5ad",
        "target_pred_unadapted.h5ad",
        "target_summary.tsv",
    )
    return [f"results/{ds}/fold{fold}/adapt/{name}" for fold in folds(ds) for name in names]


def dataset_targets(ds):
    """Everything a finished run of one dataset produces, its runtime table last."""
    return dataset_results(ds) + [f"results/{ds}/runtime.tsv", f"results/{ds}/figures/runtime.png"]


def benchmark_dirs(ds):
    """Where the dataset's jobs and the shared (scGPT checkpoint) jobs write benchmark files."""
    return [f"results/{ds}/benchmarks", "results/benchmarks"]


def dataset_results(ds):
    """Every result of one dataset (the runtime table waits for all of them)."""
    targets = [
        f"results/{ds}/processed.h5ad",
        f"results/{ds}/gene_vocab.tsv",
        f"results/{ds}/metrics_summary.tsv",
        f"results/{ds}/figures/metric_comparison.png",
        f"results/{ds}/figures/gene_vocab_coverage.png",
    ]
    for fold in folds(ds):
        targets += [
            f"results/{ds}/fold{fold}/figures/delta_scatter.png",
            f"results/{ds}/fold{fold}/figures/loss_curves.png",
        ]
        targets += [f"results/{ds}/fold{fold}/{method}/pca.png" for method in METHODS]
    return targets + adapt_targets(ds)


def print_headlines():
    """After a successful run: where each dataset's summary is, CCFM beside the baselines."""
    from ccfm.headline import headline

    for ds in DATASETS:
        summary = Path(f"results/{ds}/metrics_summary.tsv")
        if summary.exists():
            try:
                print(headline(summary), file=sys.stderr)
            except ValueError as error:  # e.g. a run whose methods leave out ccfm or a baseline
                print(f"{summary}: {error}", file=sys.stderr)
    print("HTML report of this run: snakemake --report report.html", file=sys.stderr)
