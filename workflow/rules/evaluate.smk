# Baselines, scoring (cell-eval + compact literature metrics), the summary table and the report
# figures. Processed and fold files carry canonical labels (docs/architecture.md): perturbation
# column `target_gene`, controls `non-targeting`, whatever the raw dataset called them.

from ccfm import CONTROL_LABEL, PERT_COLUMN


rule baseline:
    input:
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
        real="results/{ds}/fold{fold}/real.h5ad",
        # every gene of the input is written back into the prediction (ccfm.data.gene_fill)
        genes="results/{ds}/genes.tsv",
        raw=lambda wc: raw_input(wc.ds),
    output:
        pred="results/{ds}/fold{fold}/{method}/pred.h5ad",
        means="results/{ds}/fold{fold}/{method}/pred_means.csv",
    log:
        "logs/{ds}/fold{fold}/{method}/baseline.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/{method}/baseline.tsv"
    wildcard_constraints:
        method="|".join(BASELINES),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + input.size_mb) * attempt),
        runtime=60,
    params:
        extra_labels=lambda wc: list(ds_cfg(wc.ds)["predict"]),
        cells_per_perturbation=lambda wc: section(wc.ds, "generate")["cells_per_perturbation"],
        # One draw of control cells per fold, shared by all baselines (seed + fold).
        seed=lambda wc: config["seed"] + int(wc.fold),
        chunk_size=lambda wc: section(wc.ds, "preprocess")["chunk_size"],
    script:
        "../scripts/baseline.py"


rule score:
    # All methods of a fold in one job: cell-eval's numba kernels compile once per process.
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        preds=lambda wc: method_files(wc, "pred.h5ad"),
        # the cell-level metrics' PCA space is fitted on the fold's real training cells
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        results=expand("results/{{ds}}/fold{{fold}}/{method}/celleval_results.csv", method=METHODS),
        agg=[
            report(
                f"results/{{ds}}/fold{{fold}}/{method}/celleval_agg.csv",
                caption="../report/celleval_agg.rst",
                category="Metrics",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": method, "table": "cell-eval aggregate"},
            )
            for method in METHODS
        ],
        compact=[
            report(
                f"results/{{ds}}/fold{{fold}}/{method}/compact_metrics.tsv",
                caption="../report/compact_metrics.rst",
                category="Metrics",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": method, "table": "per perturbation"},
            )
            for method in METHODS
        ],
    log:
        "logs/{ds}/fold{fold}/score.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/score.tsv"
    conda:
        ENV
    threads: 2
    resources:
        # cell-eval holds a prediction and the real cells in memory and densifies per perturbation.
        mem_mb=lambda wc, input, attempt: int((4000 + 6 * scored_mb(input) / len(METHODS)) * attempt),
        runtime=lambda wc, attempt: 60 * len(METHODS) * attempt,
    params:
        methods=METHODS,
        control_label=CONTROL_LABEL,
        pert_col=PERT_COLUMN,
        cell_eval_profile=lambda wc: section(wc.ds, "score")["profile"],
        top_de=lambda wc: section(wc.ds, "score")["top_de"],
        seed=config["seed"],
    script:
        "../scripts/score.py"


# An optional method (state) in a job of its own: which ones run depends on the dataset and
# the installed extras, and an output list cannot depend on wildcards.
use rule score as score_optional_method with:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        preds=["results/{ds}/fold{fold}/{method}/pred.h5ad"],
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        results=["results/{ds}/fold{fold}/{method}/celleval_results.csv"],
        agg=[
            report(
                "results/{ds}/fold{fold}/{method}/celleval_agg.csv",
                caption="../report/celleval_agg.rst",
                category="Metrics",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "table": "cell-eval aggregate"},
            )
        ],
        compact=[
            report(
                "results/{ds}/fold{fold}/{method}/compact_metrics.tsv",
                caption="../report/compact_metrics.rst",
                category="Metrics",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "table": "per perturbation"},
            )
        ],
    log:
        "logs/{ds}/fold{fold}/{method}/score.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/{method}/score.tsv"
    wildcard_constraints:
        method="|".join(OPTIONAL_METHODS),
    resources:
        mem_mb=lambda wc, input, attempt: int((4000 + 6 * scored_mb(input)) * attempt),
        runtime=lambda wc, attempt: 60 * attempt,
    params:
        # one method; the other params come from rule score
        methods=lambda wc: [wc.method],


rule summarize:
    input:
        compact=lambda wc: [path for _, _, path in summary_tables(wc.ds, "compact_metrics.tsv")],
        agg=lambda wc: [path for _, _, path in summary_tables(wc.ds, "celleval_agg.csv")],
    output:
        summary=report(
            "results/{ds}/metrics_summary.tsv",
            caption="../report/metrics_summary.rst",
            category="Metrics",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "method": "all", "table": "summary"},
        ),
    log:
        "logs/{ds}/summarize.log",
    benchmark:
        "results/{ds}/benchmarks/summarize.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    params:
        # method and fold of each input table, in input order
        methods=lambda wc: [method for method, _, _ in summary_tables(wc.ds, "compact_metrics.tsv")],
        folds=lambda wc: [fold for _, fold, _ in summary_tables(wc.ds, "compact_metrics.tsv")],
    script:
        "../scripts/summarize.py"


rule figure_metrics:
    input:
        summary="results/{ds}/metrics_summary.tsv",
    output:
        png=report(
            "results/{ds}/figures/metric_comparison.png",
            caption="../report/metric_comparison.rst",
            category="Metrics",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "method": "all", "table": "comparison figure"},
        ),
    log:
        "logs/{ds}/figure_metrics.log",
    benchmark:
        "results/{ds}/benchmarks/figure_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    script:
        "../scripts/figure_metrics.py"


rule figure_delta_scatter:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        means=lambda wc: [f"results/{wc.ds}/fold{wc.fold}/{method}/pred_means.csv" for method in methods(wc.ds)],
    output:
        png=report(
            "results/{ds}/fold{fold}/figures/delta_scatter.png",
            caption="../report/delta_scatter.rst",
            category="Predictions",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "method": "all", "figure": "delta scatter"},
        ),
    log:
        "logs/{ds}/fold{fold}/figure_delta_scatter.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/figure_delta_scatter.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + 3 * input.size_mb) * attempt),
        runtime=20,
    params:
        n_perturbations=4,
        control_label=CONTROL_LABEL,
    script:
        "../scripts/figure_delta_scatter.py"


rule figure_pca:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        preds=lambda wc: method_files(wc, "pred.h5ad"),
        # the cell-level metrics' PCA space is fitted on the fold's real training cells
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        png=[
            report(
                f"results/{{ds}}/fold{{fold}}/{method}/pca.png",
                caption="../report/prediction_pca.rst",
                category="Predictions",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": method, "figure": "PCA"},
            )
            for method in METHODS
        ],
    log:
        "logs/{ds}/fold{fold}/figure_pca.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/figure_pca.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + 3 * input.size_mb / len(METHODS)) * attempt),
        runtime=lambda wc, attempt: 20 * attempt,
    params:
        methods=METHODS,
        seed=config["seed"],
        control_label=CONTROL_LABEL,
    script:
        "../scripts/figure_pca.py"


use rule figure_pca as figure_pca_optional_method with:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        preds=["results/{ds}/fold{fold}/{method}/pred.h5ad"],
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        png=[
            report(
                "results/{ds}/fold{fold}/{method}/pca.png",
                caption="../report/prediction_pca.rst",
                category="Predictions",
                subcategory="{ds}",
                labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "figure": "PCA"},
            )
        ],
    log:
        "logs/{ds}/fold{fold}/{method}/figure_pca.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/{method}/figure_pca.tsv"
    wildcard_constraints:
        method="|".join(OPTIONAL_METHODS),
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + 3 * input.size_mb) * attempt),
        runtime=lambda wc, attempt: 20 * attempt,
    params:
        methods=lambda wc: [wc.method],


rule figure_gene_vocab:
    input:
        vocab="results/{ds}/gene_vocab.tsv",
    output:
        png=report(
            "results/{ds}/figures/gene_vocab_coverage.png",
            caption="../report/gene_vocab_figure.rst",
            category="scGPT",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "table": "vocab coverage figure"},
        ),
    log:
        "logs/{ds}/figure_gene_vocab.log",
    benchmark:
        "results/{ds}/benchmarks/figure_gene_vocab.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    script:
        "../scripts/figure_gene_vocab.py"


rule figure_loss:
    input:
        losses=expand("results/{{ds}}/fold{{fold}}/{variant}/loss.tsv", variant=MODEL_VARIANTS),
    output:
        png=report(
            "results/{ds}/fold{fold}/figures/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Training",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "model": "all variants", "figure": "loss curves compared"},
        ),
    log:
        "logs/{ds}/fold{fold}/figure_loss.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/figure_loss.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    script:
        "../scripts/figure_loss.py"


rule prediction_table:
    input:
        preds=lambda wc: [path for _, _, path in summary_tables(wc.ds, "pred.h5ad")],
        splits=lambda wc: [f"results/{wc.ds}/splits/fold{fold}.json" for fold in folds(wc.ds)],
    output:
        table=report(
            "results/{ds}/predictions.tsv",
            caption="../report/predictions.rst",
            category="Predictions",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "method": "all", "table": "predicted perturbations"},
        ),
    log:
        "logs/{ds}/prediction_table.log",
    benchmark:
        "results/{ds}/benchmarks/prediction_table.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    params:
        # method and fold of each prediction file, in input order
        methods=lambda wc: [method for method, _, _ in summary_tables(wc.ds, "pred.h5ad")],
        folds=lambda wc: [fold for _, fold, _ in summary_tables(wc.ds, "pred.h5ad")],
        split_folds=lambda wc: folds(wc.ds),
    script:
        "../scripts/prediction_table.py"


rule runtime:
    # After every other job of the dataset: their benchmark files are complete then.
    input:
        results=lambda wc: dataset_results(wc.ds),
    output:
        table=report(
            "results/{ds}/runtime.tsv",
            caption="../report/runtime.rst",
            category="Runtime",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "table": "per job"},
        ),
        png=report(
            "results/{ds}/figures/runtime.png",
            caption="../report/runtime.rst",
            category="Runtime",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "table": "figure"},
        ),
    log:
        "logs/{ds}/runtime.log",
    benchmark:
        "results/{ds}/benchmarks/runtime.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    params:
        benchmark_dirs=lambda wc: benchmark_dirs(wc.ds),
    script:
        "../scripts/runtime.py"
