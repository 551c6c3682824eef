# Target-context stage (datasets with a `target:` block): learn a per-gene MMD shift that makes
# the target's control cells look like the source controls to the trained model, predict the
# target perturbations from the shifted (and, for comparison, the unshifted) target controls,
# and score both beside baselines built from the target controls. Final targets per dataset and
# fold: adapt/{shift.safetensors, mmd.tsv, history.png, target_pred.h5ad,
# target_pred_unadapted.h5ad, target_summary.tsv} and the Virtual Cell Challenge submissions
# adapt/{ccfm,state}.vcc (`vcc_submission`; see `adapt_targets` and `vcc_targets` in common.smk).
# One path for every model: these rules serve CCFM (params `method: ccfm`, `model`: its model.pt);
# state.smk makes State's twins (adapt_state, predict_target_state, score_target_state) with
# `use rule ... with:`, changing only inputs, outputs, log, benchmark, params and conda; the
# scripts and the package path (ccfm.adapt.adaptable) are the same.


rule adapt_mmd:
    input:
        model="results/{ds}/fold{fold}/ccfm/model.pt",
        processed="results/{ds}/processed.h5ad",
        target="results/{ds}/target_processed.h5ad",
        source_files=lambda wc: adapt_source_files(wc.ds),
    output:
        shift="results/{ds}/fold{fold}/adapt/shift.safetensors",
        mmd=report(
            "results/{ds}/fold{fold}/adapt/mmd.tsv",
            caption="../report/adapt_mmd.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "table": "MMD before/after"},
        ),
        history="results/{ds}/fold{fold}/adapt/history.tsv",
        plot=report(
            "results/{ds}/fold{fold}/adapt/history.png",
            caption="../report/adapt_history.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "figure": "MMD during adaptation"},
        ),
    log:
        "logs/{ds}/fold{fold}/adapt/adapt_mmd.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt/adapt_mmd.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=60,
        # Each step encodes two batches of controls through the model: GPU work at full size.
        gpu=1,
    params:
        # which model the shift adapts to (ccfm.adapt.adaptable.ADAPTABLE_MODELS) and its file
        method="ccfm",
        model=lambda wc, input: input.model,
        settings=lambda wc: section(wc.ds, "adapt"),
        source_options=lambda wc: adapt_source_options(wc.ds),
        seed=config["seed"],
        title=lambda wc: f"{wc.ds} fold {wc.fold}: target vs source controls",
    script:
        "../scripts/adapt_mmd.py"


rule predict_target:
    input:
        model="results/{ds}/fold{fold}/ccfm/model.pt",
        target="results/{ds}/target_processed.h5ad",
        shift="results/{ds}/fold{fold}/adapt/shift.safetensors",
        requests=lambda wc: target_predict_csv(wc.ds),
    output:
        pred="results/{ds}/fold{fold}/adapt/target_pred.h5ad",
        means="results/{ds}/fold{fold}/adapt/target_pred_means.csv",
        pred_unadapted="results/{ds}/fold{fold}/adapt/target_pred_unadapted.h5ad",
        means_unadapted="results/{ds}/fold{fold}/adapt/target_pred_unadapted_means.csv",
    log:
        "logs/{ds}/fold{fold}/adapt/predict_target.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt/predict_target.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=120,
        gpu=1,
    params:
        method="ccfm",
        model=lambda wc, input: input.model,
        generate=lambda wc: section(wc.ds, "generate"),
        # Empty: every observed target perturbation the model can embed. A CSV path: its
        # target_gene column, with its n_cells cells each.
        requested=lambda wc: target_predict(wc.ds),
        seed=config["seed"],
    script:
        "../scripts/predict_target.py"


rule score_target:
    input:
        target="results/{ds}/target_processed.h5ad",
        processed="results/{ds}/processed.h5ad",
        pred="results/{ds}/fold{fold}/adapt/target_pred.h5ad",
        pred_unadapted="results/{ds}/fold{fold}/adapt/target_pred_unadapted.h5ad",
    output:
        metrics="results/{ds}/fold{fold}/adapt/target_metrics.tsv",
        summary=report(
            "results/{ds}/fold{fold}/adapt/target_summary.tsv",
            caption="../report/adapt_target_scores.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "table": "target scores"},
        ),
    log:
        "logs/{ds}/fold{fold}/adapt/score_target.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt/score_target.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=60,
    params:
        # names the model's rows: {method}_adapted, {method}_unadapted
        method="ccfm",
        cells_per_perturbation=lambda wc: section(wc.ds, "generate")["cells_per_perturbation"],
        top_de=lambda wc: section(wc.ds, "score")["top_de"],
        cell_eval_profile=lambda wc: section(wc.ds, "score")["profile"],
        seed=config["seed"],
    script:
        "../scripts/score_target.py"


# The Virtual Cell Challenge submission of an adapted target prediction (CCFM's, or State's where
# it runs): every gene of the target file in its order (genes outside the model's panel filled
# with the target controls' expression), `non-targeting` controls included, written by
# cell-eval's own `prep`. `snakemake <dataset>_vcc` builds only these.
rule vcc_submission:
    input:
        pred=vcc_prediction,
        target_raw=lambda wc: target_raw_input(wc.ds),
        target="results/{ds}/target_processed.h5ad",
    output:
        vcc="results/{ds}/fold{fold}/adapt/{method}.vcc",
        summary=report(
            "results/{ds}/fold{fold}/adapt/{method}_vcc.tsv",
            caption="../report/vcc_submission.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "table": "{method} challenge submission"},
        ),
    log:
        "logs/{ds}/fold{fold}/adapt/vcc_submission_{method}.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt/{method}/vcc_submission.tsv"
    wildcard_constraints:
        method="|".join(VCC_METHODS),
    conda:
        ENV
    threads: 1
    resources:
        # Only the target's control cells are read (sparse); H1's ~40k controls x 18,080 genes fit.
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=60,
    params:
        settings=lambda wc: preprocess_target_settings(wc.ds),
        # target.predict's perturbations (the challenge's); empty: every predicted one
        perturbations=lambda wc: target_predict_labels(wc.ds),
        seed=config["seed"],
    script:
        "../scripts/vcc_submission.py"
