# Config validation and input functions shared by all rules.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from ccfm.config import dataset_config, dataset_section, predict_only, validate_config

validate_config(config)

DATASETS = list(config["datasets"])
BASELINES = ["nochange", "additive", "meanpert"]
MODEL_VARIANTS = ["ccfm", "ccfm_nolatent"]
METHODS = BASELINES + MODEL_VARIANTS
# Optional methods (workflow/rules/state.smk): scored where enabled and installed (state_runs).
OPTIONAL_METHODS = ["state"]
ENV = "../../envs/ccfm.yaml"


wildcard_constraints:
    ds="|".join(DATASETS),
    fold=r"\d+",
    method="|".join(METHODS + OPTIONAL_METHODS),
    variant="|".join(MODEL_VARIANTS),


def method_files(wc, name):
    """One file per scored method of a fold, in METHODS order: results/{ds}/fold{k}/{method}/{name}."""
    return [f"results/{wc.ds}/fold{wc.fold}/{method}/{name}" for method in METHODS]


def scored_mb(input):
    """Size in MB of what a score job holds in memory: the real cells and the predictions
    (processed.h5ad is only sampled for the PCA space, so it does not count)."""
    return sum(Path(path).stat().st_size for path in [input.real, *input.preds]) / 1e6


def summary_tables(ds, name):
    """(method, fold, path) of one score table per method and fold, the summary's input order."""
    return [(method, fold, f"results/{ds}/fold{fold}/{method}/{name}") for method in methods(ds) for fold in folds(ds)]


def uses_latent(wc):
    """The `ccfm` variant trains on scGPT features unless the dataset turns `latent` off."""
    return wc.variant == "ccfm" and bool(section(wc.ds, "latent")["enabled"])


def datasets_matching(predicate):
    """Regex alternation of the datasets whose config block satisfies ``predicate``.

    Rules producing the same file for different sources (simulation, download) each match only
    their own datasets, which keeps the DAG unambiguous; "(?!x)x" never matches.
    """
    return "|".join(ds for ds, spec in config["datasets"].items() if predicate(spec)) or "(?!x)x"


def target_is_downloaded(spec):
    """A simulated dataset's target comes from the simulation; only other datasets download theirs."""
    return spec["source"] != "simulate" and spec.get("target", {}).get("source") == "url"


LABEL_KEYS = ("perturbation_column", "control_label", "combo_separator", "input_scale")
# Guide indices ("ZAP70_1") are stripped from gene labels; drug names may be numbers: keep them.
GUIDE_TOKEN = {"gene": r"^\d+$", "drug": None}


def preprocess_settings(ds):
    """Preprocess settings: label conventions, gene selection and the predict entries."""
    return {
        "dataset": ds,
        **{key: ds_cfg(ds)[key] for key in LABEL_KEYS},
        "perturbation_type": ds_cfg(ds)["perturbation_type"],
        "guide_token_pattern": GUIDE_TOKEN[ds_cfg(ds)["perturbation_type"]],
        **{key: section(ds, "preprocess")[key] for key in ("n_top_genes", "target_sum", "chunk_size")},
        # validated against the data's genes (drugs: its drugs) before any work; genes are kept
        "predict": list(ds_cfg(ds).get("predict", [])),
    }


def preprocess_target_settings(ds):
    """Target preprocess settings — the target block may name its own labels and scale."""
    target = config["datasets"][ds]["target"]
    return {
        "dataset": ds,
        **{key: ds_cfg(ds)[key] for key in LABEL_KEYS},
        **{key: value for key, value in target.items() if key in LABEL_KEYS},
        # the target's own scale setting (not the source's): detected unless given
        "input_scale": target.get("input_scale", "auto"),
        "guide_token_pattern": GUIDE_TOKEN[ds_cfg(ds)["perturbation_type"]],
        **{key: section(ds, "preprocess")[key] for key in ("target_sum", "chunk_size")},
        "predict": target_predict_labels(ds),
    }


# Settings that only verify or validate (checksums, min_shared_genes, the fold checks) are params
# computed by functions that take `input` or `output`: Snakemake counts those as derived and does not
# rerun a job when they change, so pinning a checksum or lowering a threshold redoes nothing.


def download_checks(ds):
    """Checksums and the allow_* switches of a dataset's files, by config block (dataset, target)."""
    spec = ds_cfg(ds)
    keys = ("md5", "sha256", "allow_unverified", "allow_http")
    blocks = {"dataset": spec, **({"target": spec["target"]} if "target" in spec else {})}
    return {block: {key: values.get(key) for key in keys} for block, values in blocks.items()}


def target_checks(ds):
    """What preprocess_target only checks: the perturbation type and the genes the target must share."""
    spec = ds_cfg(ds)
    return {
        "perturbation_type": spec["perturbation_type"],
        "min_shared_genes": float(spec["target"]["min_shared_genes"]),
    }


def fold_checks(ds):
    """What the split checks a fold against (the cell-eval profile and the batch size later rules use)."""
    return {
        "cell_eval_profile": section(ds, "score")["profile"],
        "batch_size": int(section(ds, "train")["batch_size"]),
    }


def target_predict(ds):
    """`target.predict`: a list of perturbations, or the path of a challenge-style CSV."""
    return config["datasets"][ds]["target"].get("predict", [])


def target_predict_csv(ds):
    """The `target.predict` CSV as an input file list (empty for a YAML list)."""
    value = target_predict(ds)
    return [value] if isinstance(value, str) else []


def target_predict_labels(ds):
    """The perturbations `target.predict` names (read from its CSV when it is one)."""
    from ccfm.adapt.requests import target_requests

    return target_requests(target_predict(ds)).labels


def adapt_source_files(ds):
    """`adapt.source_files`: extra h5ad files whose control cells join the source controls."""
    return list(section(ds, "adapt")["source_files"])


def adapt_source_options(ds):
    """How the extra source files are read: the dataset's labels and normalisation."""
    return {
        "perturbation_column": ds_cfg(ds)["perturbation_column"],
        "control_label": ds_cfg(ds)["control_label"],
        "target_sum": section(ds, "preprocess")["target_sum"],
    }


VCC_METHODS = ["ccfm", "state"]


def vcc_methods(ds):
    """Methods a dataset writes a challenge submission for: CCFM, and State where it runs."""
    return ["ccfm"] + (["state"] if state_runs(ds) else [])


def vcc_prediction(wc):
    """The adapted target prediction a submission is assembled from."""
    folder = "adapt" if wc.method == "ccfm" else "adapt_state"
    return f"results/{wc.ds}/fold{wc.fold}/{folder}/target_pred.h5ad"


def vcc_targets(ds):
    """The challenge submissions (`.vcc`) of a dataset with a target, and their summaries."""
    if not has_target(ds):
        return []
    return [
        f"results/{ds}/fold{fold}/adapt/{method}{suffix}"
        for fold in folds(ds)
        for method in vcc_methods(ds)
        for suffix in (".vcc", "_vcc.tsv")
    ]


def methods(ds):
    """The scored methods of a dataset: baselines, CCFM variants and `state` where it runs."""
    return METHODS + (["state"] if state_runs(ds) else [])


_STATE_STATUS = {}


def state_status(ds):
    """(runs, reason) of the optional `state` method for one dataset, worked out once.

    The optional State add-on is imported here, on the first call, not at the top of the rule
    files (ccfm.state.train reads arc-state's version from its metadata; it never imports it).
    """
    if ds not in _STATE_STATUS:
        from ccfm.state.train import state_status as status_of_settings

        _STATE_STATUS[ds] = status_of_settings(section(ds, "state"))
    return _STATE_STATUS[ds]


def state_runs(ds):
    """Whether the `state` method (and State's adapter) runs for the dataset."""
    return state_status(ds)[0]


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
    if state_runs(ds):
        targets += [f"results/{ds}/fold{fold}/adapt_state/{name}" for fold in folds(ds) for name in names]
    return targets + vcc_targets(ds)


def dataset_targets(ds):
    """Everything a finished run of one dataset produces, its runtime table last."""
    return dataset_results(ds) + [f"results/{ds}/runtime.tsv", f"results/{ds}/figures/runtime.png"]


def benchmark_dirs(ds):
    """Where the dataset's jobs and the shared (scGPT checkpoint) jobs write benchmark files."""
    return [f"results/{ds}/benchmarks", "results/benchmarks"]


def dataset_results(ds):
    """Every result of one dataset (the runtime table waits for all of them).

    Predict only (split.heldout_fraction: 0): nothing is held out, so no scores and no figures that
    compare with held-out cells; the predictions and their table are the results.
    """
    targets = [
        f"results/{ds}/processed.h5ad",
        f"results/{ds}/gene_vocab.tsv",
        f"results/{ds}/figures/gene_vocab_coverage.png",
        f"results/{ds}/predictions.tsv",
    ]
    if predict_only(config, ds):
        return targets + [f"results/{ds}/fold{fold}/figures/loss_curves.png" for fold in folds(ds)] + adapt_targets(ds)
    targets += [f"results/{ds}/metrics_summary.tsv", f"results/{ds}/figures/metric_comparison.png"]
    for fold in folds(ds):
        targets += [
            f"results/{ds}/fold{fold}/figures/delta_scatter.png",
            f"results/{ds}/fold{fold}/figures/loss_curves.png",
        ]
        targets += [f"results/{ds}/fold{fold}/{method}/pca.png" for method in methods(ds)]
    return targets + adapt_targets(ds)


def print_headlines():
    """After a successful run: where each dataset's summary is, CCFM beside the baselines."""
    from ccfm.evaluate.headline import headline, target_headline
    from ccfm.io.predictions import predictions_headline

    for ds in DATASETS:
        summary = Path(f"results/{ds}/metrics_summary.tsv")
        if predict_only(config, ds) and Path(f"results/{ds}/predictions.tsv").exists():
            print(predictions_headline(ds, f"results/{ds}/predictions.tsv"), file=sys.stderr)
        elif summary.exists():
            try:
                print(headline(summary), file=sys.stderr)
            except ValueError as error:  # e.g. a run whose methods leave out ccfm or a baseline
                print(f"{summary}: {error}", file=sys.stderr)
        for path in sorted(Path(f"results/{ds}").glob("fold*/adapt*/target_summary.tsv")):
            print(target_headline(path), file=sys.stderr)
        for path in sorted(Path(f"results/{ds}").glob("fold*/adapt/*.vcc")):
            print(f"challenge submission: {path}", file=sys.stderr)
    print("HTML report of this run: snakemake --report report.html", file=sys.stderr)
