"""End to end: the `state` method on a small simulated screen (with the [state] extra), and the
pipeline without it (arc-state hidden): it runs and says `state` was skipped, in one line."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ccfm.state.train import HIDE_ENV, arc_state_version
from pipeline_utils import STATE_DEMO_OVERRIDES, copy_pipeline, describe_failure, snakemake

pytestmark = pytest.mark.slow

SKIP_LINE = "state: skipped, arc-state is not installed"


@pytest.mark.skipif(arc_state_version() is None, reason="needs the [state] extra (pip install -e '.[state]')")
def test_state_trains_predicts_is_scored_and_adapts(tmp_path, monkeypatch):
    monkeypatch.delenv(HIDE_ENV, raising=False)
    workdir = copy_pipeline(tmp_path, STATE_DEMO_OVERRIDES)
    fold = workdir / "results/demo/fold1"
    targets = [
        "results/demo/fold1/state/compact_metrics.tsv",
        "results/demo/fold1/state/celleval_agg.csv",
        "results/demo/fold1/nochange/compact_metrics.tsv",
        "results/demo/fold1/adapt_state/target_summary.tsv",
        "results/demo/fold1/adapt_state/history.png",
    ]
    result = snakemake(workdir, "-c2", *targets)
    assert result.returncode == 0, describe_failure(result, workdir)
    assert SKIP_LINE not in result.stderr

    # arc-state's own run directory, loadable, and a benchmark of the training job.
    for name in ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "checkpoints/final.ckpt"):
        assert (fold / "state/run" / name).is_file(), name
    # Benchmarks follow one pattern: benchmarks/fold{k}/{output folder}/{rule}.tsv
    benchmarks = workdir / "results/demo/benchmarks/fold1"
    assert (benchmarks / "state/train_state.tsv").is_file()
    for rule in ("adapt_state", "predict_target_state", "score_target_state"):
        assert (benchmarks / "adapt_state" / f"{rule}.tsv").is_file(), rule
    loss = pd.read_csv(fold / "state/loss.tsv", sep="\t")
    assert len(loss) >= 2 and np.isfinite(loss["loss"]).all()

    # Same perturbations and the same control cells as the baselines.
    split = json.loads((workdir / "results/demo/splits/fold1.json").read_text())
    pred = ad.read_h5ad(fold / "state/pred.h5ad")
    base = ad.read_h5ad(fold / "nochange/pred.h5ad")
    labels = set(pred.obs["target_gene"].astype(str))
    assert set(split["test"]) | {"non-targeting"} == labels == set(base.obs["target_gene"].astype(str))
    assert pred.n_obs == base.n_obs and list(pred.var_names) == list(base.var_names)
    controls = pred.obs["target_gene"].astype(str).to_numpy() == "non-targeting"
    np.testing.assert_allclose(pred.X[controls].toarray(), base.X[controls].toarray())

    compact = pd.read_csv(fold / "state/compact_metrics.tsv", sep="\t")
    assert set(compact["perturbation"]) == set(split["test"])
    assert np.isfinite(compact[["pearson_delta_pseudobulk", "mse"]].to_numpy(dtype=float)).all()

    # The adapter on the pipeline-trained State model lowers the held-out MMD.
    mmd = pd.read_csv(fold / "adapt_state/mmd.tsv", sep="\t").set_index("heldout_part")
    assert mmd.loc["test", "mmd2_after"] < mmd.loc["test", "mmd2_before"]
    summary = pd.read_csv(fold / "adapt_state/target_summary.tsv", sep="\t")
    assert {"state_adapted", "state_unadapted", "nochange", "additive", "cellmean"} == set(summary["method"])
    target_pred = ad.read_h5ad(fold / "adapt_state/target_pred.h5ad")
    assert "non-targeting" in set(target_pred.obs["target_gene"].astype(str))
    means = pd.read_csv(fold / "adapt_state/target_pred_means.csv", index_col=0)
    assert set(means.index) == set(target_pred.obs["target_gene"].astype(str)) - {"non-targeting"}


def test_without_arc_state_the_pipeline_runs_and_says_state_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(HIDE_ENV, "1")
    workdir = copy_pipeline(tmp_path, STATE_DEMO_OVERRIDES)
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "train_state" not in dry.stdout and "adapt_state" not in dry.stdout
    result = snakemake(workdir, "-c1", "results/demo/splits/fold1.json")
    assert result.returncode == 0, describe_failure(result, workdir)
    output = result.stdout + result.stderr
    assert output.count(SKIP_LINE) == 1, output[-3000:]
    assert "Traceback" not in output
