# Arc Institute's State transition model as a scored method (`state`), and the MMD shift adapter
# on a State run directory. Optional: needs the `[state]` extra (arc-state); `state.enabled:
# auto` (default) runs it where arc-state is installed and skips it with one line otherwise
# (state_status in common.smk). State's fold predictions land where every method's do
# (results/{ds}/fold{k}/state/pred.h5ad) and are scored by the shared `score` rule.


include: "state_common.smk"


rule train_state:
    input:
        processed="results/{ds}/processed.h5ad",
        split="results/{ds}/splits/fold{fold}.json",
    output:
        # The State run directory written by `state tx train` (checked by loading it back safely).
        config="results/{ds}/fold{fold}/state/run/config.yaml",
        var_dims="results/{ds}/fold{fold}/state/run/var_dims.pkl",
        pert_map="results/{ds}/fold{fold}/state/run/pert_onehot_map.pt",
        checkpoint="results/{ds}/fold{fold}/state/run/checkpoints/final.ckpt",
        loss=report(
            "results/{ds}/fold{fold}/state/loss.tsv",
            caption="../report/state_loss.rst",
            category="Training",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "model": "state", "table": "loss log"},
        ),
    log:
        "logs/{ds}/fold{fold}/state/train_state.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/state/train_state.tsv"
    conda:
        "../../envs/state.yaml"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc: max(30, int(state_settings(wc.ds)["steps"]) // 100),
        gpu=1,
    params:
        settings=lambda wc: state_settings(wc.ds),
        seed=config["seed"],
    script:
        "../scripts/train_state.py"


rule predict_state:
    input:
        config="results/{ds}/fold{fold}/state/run/config.yaml",
        checkpoint="results/{ds}/fold{fold}/state/run/checkpoints/final.ckpt",
        split="results/{ds}/splits/fold{fold}.json",
        real="results/{ds}/fold{fold}/real.h5ad",
        # every gene of the input is written back into the prediction (ccfm.data.gene_fill)
        processed="results/{ds}/processed.h5ad",
        genes="results/{ds}/genes.tsv",
        raw=lambda wc: raw_input(wc.ds),
    output:
        pred="results/{ds}/fold{fold}/state/pred.h5ad",
        means="results/{ds}/fold{fold}/state/pred_means.csv",
    log:
        "logs/{ds}/fold{fold}/state/predict_state.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/state/predict_state.tsv"
    conda:
        "../../envs/state.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=60,
    params:
        extra_labels=lambda wc: list(ds_cfg(wc.ds)["predict"]),
        cells_per_perturbation=lambda wc: section(wc.ds, "generate")["cells_per_perturbation"],
        # The baselines' control draw (seed + fold): every method starts from the same cells.
        seed=lambda wc: config["seed"] + int(wc.fold),
    script:
        "../scripts/predict_state.py"


# The MMD adapter on a State run directory: CCFM's rules (adapt.smk) and scripts with State's
# model files, outputs under adapt_state/ and State's environment (ccfm.state.adapt implements the
# adapter's interface, ccfm.adapt.adaptable).
use rule adapt_mmd as adapt_state with:
    input:
        unpack(lambda wc: state_run_files(wc.ds, wc.fold)),
        processed="results/{ds}/processed.h5ad",
        target="results/{ds}/target_processed.h5ad",
        source_files=lambda wc: adapt_source_files(wc.ds),
    output:
        shift="results/{ds}/fold{fold}/adapt_state/shift.safetensors",
        mmd=report(
            "results/{ds}/fold{fold}/adapt_state/mmd.tsv",
            caption="../report/adapt_mmd.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "table": "MMD before/after (State)"},
        ),
        history="results/{ds}/fold{fold}/adapt_state/history.tsv",
        plot=report(
            "results/{ds}/fold{fold}/adapt_state/history.png",
            caption="../report/adapt_history.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "figure": "MMD during adaptation (State)"},
        ),
    log:
        "logs/{ds}/fold{fold}/adapt_state/adapt_state.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt_state/adapt_state.tsv"
    conda:
        "../../envs/state.yaml"
    params:
        method="state",
        model=lambda wc: state_run_dir(wc.ds, wc.fold),
        title=lambda wc: f"{wc.ds} fold {wc.fold}: State basal encoder, target vs source controls",


use rule predict_target as predict_target_state with:
    input:
        unpack(lambda wc: state_run_files(wc.ds, wc.fold)),
        target="results/{ds}/target_processed.h5ad",
        shift="results/{ds}/fold{fold}/adapt_state/shift.safetensors",
        requests=lambda wc: target_predict_csv(wc.ds),
    output:
        pred="results/{ds}/fold{fold}/adapt_state/target_pred.h5ad",
        means="results/{ds}/fold{fold}/adapt_state/target_pred_means.csv",
        pred_unadapted="results/{ds}/fold{fold}/adapt_state/target_pred_unadapted.h5ad",
        means_unadapted="results/{ds}/fold{fold}/adapt_state/target_pred_unadapted_means.csv",
    log:
        "logs/{ds}/fold{fold}/adapt_state/predict_target_state.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt_state/predict_target_state.tsv"
    conda:
        "../../envs/state.yaml"
    # State predicts on the CPU, one cell set at a time.
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=60,
    params:
        method="state",
        model=lambda wc: state_run_dir(wc.ds, wc.fold),


use rule score_target as score_target_state with:
    input:
        target="results/{ds}/target_processed.h5ad",
        processed="results/{ds}/processed.h5ad",
        pred="results/{ds}/fold{fold}/adapt_state/target_pred.h5ad",
        pred_unadapted="results/{ds}/fold{fold}/adapt_state/target_pred_unadapted.h5ad",
    output:
        metrics="results/{ds}/fold{fold}/adapt_state/target_metrics.tsv",
        summary=report(
            "results/{ds}/fold{fold}/adapt_state/target_summary.tsv",
            caption="../report/adapt_target_scores.rst",
            category="Target context",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "fold": "{fold}", "table": "target scores (State)"},
        ),
    log:
        "logs/{ds}/fold{fold}/adapt_state/score_target_state.log",
    benchmark:
        "results/{ds}/benchmarks/fold{fold}/adapt_state/score_target_state.tsv"
    params:
        method="state",
