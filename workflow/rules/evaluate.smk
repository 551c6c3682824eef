# Baselines, scoring (cell-eval + compact literature metrics), the summary table and the report
# figures. Processed and fold files carry canonical labels (docs/architecture.md): perturbation
# column `target_gene`, controls `non-targeting`, whatever the raw dataset called them.

from ccfm import CONTROL_LABEL, PERT_COLUMN


rule baseline:
    input:
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
        real="results/{ds}/fold{fold}/real.h5ad",
    output:
        pred="results/{ds}/fold{fold}/{method}/pred.h5ad",
        means="results/{ds}/fold{fold}/{method}/pred_means.csv",
    wildcard_constraints:
        method="|".join(BASELINES),
    params:
        predict=lambda wc: ds_cfg(wc.ds)["predict"],
        cells_per_perturbation=lambda wc: section(wc.ds, "generate")["cells_per_perturbation"],
        # One draw of control cells per fold, shared by all baselines (seed + fold).
        seed=lambda wc: config["seed"] + int(wc.fold),
        chunk_size=lambda wc: section(wc.ds, "preprocess")["chunk_size"],
    log:
        "logs/{ds}/fold{fold}/{method}/baseline.log",
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + input.size_mb) * attempt),
        runtime=60,
    conda:
        ENV
    script:
        "../scripts/baseline.py"


rule score:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        pred="results/{ds}/fold{fold}/{method}/pred.h5ad",
    output:
        results="results/{ds}/fold{fold}/{method}/celleval_results.csv",
        agg=report(
            "results/{ds}/fold{fold}/{method}/celleval_agg.csv",
            caption="../report/celleval_agg.rst",
            category="Metrics",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "table": "cell-eval aggregate"},
        ),
        compact=report(
            "results/{ds}/fold{fold}/{method}/compact_metrics.tsv",
            caption="../report/compact_metrics.rst",
            category="Metrics",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "table": "per perturbation"},
        ),
    params:
        control_label=CONTROL_LABEL,
        pert_col=PERT_COLUMN,
        profile=lambda wc: section(wc.ds, "score")["profile"],
        top_de=lambda wc: section(wc.ds, "score")["top_de"],
        seed=config["seed"],
    log:
        "logs/{ds}/fold{fold}/{method}/score.log",
    threads: 2
    resources:
        # cell-eval holds both files in memory and densifies per perturbation; grows on retry.
        mem_mb=lambda wc, input, attempt: int((4000 + 6 * input.size_mb) * attempt),
        runtime=240,
    conda:
        ENV
    script:
        "../scripts/score.py"


rule summarize:
    input:
        # One table per method and fold, in the order of params methods/folds below.
        compact=lambda wc: [
            f"results/{wc.ds}/fold{fold}/{method}/compact_metrics.tsv" for method in methods(wc.ds) for fold in folds(wc.ds)
        ],
        agg=lambda wc: [
            f"results/{wc.ds}/fold{fold}/{method}/celleval_agg.csv" for method in methods(wc.ds) for fold in folds(wc.ds)
        ],
    output:
        summary=report(
            "results/{ds}/metrics_summary.tsv",
            caption="../report/metrics_summary.rst",
            category="Metrics",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "all", "method": "all", "table": "summary"},
        ),
    params:
        methods=lambda wc: [method for method in methods(wc.ds) for _ in folds(wc.ds)],
        folds=lambda wc: [fold for _ in methods(wc.ds) for fold in folds(wc.ds)],
    log:
        "logs/{ds}/summarize.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    conda:
        ENV
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
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    conda:
        ENV
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
    params:
        n_perturbations=4,
        control_label=CONTROL_LABEL,
    log:
        "logs/{ds}/fold{fold}/figure_delta_scatter.log",
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + 3 * input.size_mb) * attempt),
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/figure_delta_scatter.py"


rule figure_pca:
    input:
        real="results/{ds}/fold{fold}/real.h5ad",
        pred="results/{ds}/fold{fold}/{method}/pred.h5ad",
    output:
        png=report(
            "results/{ds}/fold{fold}/{method}/pca.png",
            caption="../report/prediction_pca.rst",
            category="Predictions",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "method": "{method}", "figure": "PCA"},
        ),
    params:
        seed=config["seed"],
        control_label=CONTROL_LABEL,
    log:
        "logs/{ds}/fold{fold}/{method}/figure_pca.log",
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int((2000 + 3 * input.size_mb) * attempt),
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/figure_pca.py"


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
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    conda:
        ENV
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
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/figure_loss.py"

