# Input functions of the State rules (workflow/rules/state.smk) and the line that says when
# `state` does not run. state_status(), state_runs() and methods() live in common.smk.


onstart:
    # The one line that says `state` does not run (never a trace): once per run, main process only.
    for line in sorted({state_status(ds)[1] for ds in config["run"] if not state_runs(ds)}):
        print(line, file=sys.stderr)


def state_settings(ds):
    return section(ds, "state")


def state_run_dir(ds, fold):
    """The State run directory the adapter uses: `state.run_dir` if set, else the fold's own model."""
    given = state_settings(ds).get("run_dir")
    return given if given else f"results/{ds}/fold{fold}/state/run"


def state_run_files(ds, fold):
    base = state_run_dir(ds, fold)
    return {
        "config": f"{base}/config.yaml",
        "var_dims": f"{base}/var_dims.pkl",
        "pert_map": f"{base}/pert_onehot_map.pt",
    }
