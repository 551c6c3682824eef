# Config validation and input functions shared by all rules.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from ccfm.config import dataset_config, dataset_section, validate_config
from ccfm.state.train import state_status

validate_config(config)

DATASETS = list(config["datasets"])
BASELINES = ["nochange", "additive", "meanpert"]
MODEL_VARIANTS = ["ccfm", "ccfm_nolatent"]
METHODS = BASELINES + MODEL_VARIANTS
# Optional methods (workflow/rules/state.smk): scored where enabled and installed.
OPTIONAL_METHODS = ["state"]
STATE_STATUS = {ds: state_status(dataset_section(config, ds, "state")) for ds in DATASETS}
ENV = "../../envs/ccfm.yaml"


wildcard_constraints:
    ds="|".join(DATASETS),
    fold=r"\d+",
    method="|".join(METHODS + OPTIONAL_METHODS),
    variant="|".join(MODEL_VARIANTS),


def methods(ds):
    """The scored methods of a dataset: baselines, CCFM variants and `state` where it runs."""
    return METHODS + (["state"] if STATE_STATUS[ds][0] else [])


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
    targets = [f"results/{ds}/fold{fold}/adapt/{name}" for fold in folds(ds) for name in names]
    if STATE_STATUS[ds][0]:
        targets += [f"results/{ds}/fold{fold}/adapt_state/{name}" for fold in folds(ds) for name in names]
    return targets


def dataset_targets(ds):
    """Everything a finished run of one dataset produces."""
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
        targets += [f"results/{ds}/fold{fold}/{method}/pca.png" for method in methods(ds)]
    return targets + adapt_targets(ds)
