"""End to end on the demo's target context: the challenge CSV in `target.predict`, `snakemake demo_vcc`, the .vcc
files of CCFM (and of a State run directory in the released layout, via `state.run_dir`, with the [state] extra),
cell-eval prep's own checks on them, and the challenge score in target_summary.tsv."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import pandas as pd
import pytest
import yaml

from ccfm.adapt.submission import read_vcc
from ccfm.data.conditions import parse_condition
from ccfm.state.train import arc_state_version
from pipeline_utils import FAST_DEMO_OVERRIDES, copy_pipeline, describe_failure, snakemake

pytestmark = pytest.mark.slow


def _set_demo(workdir, **blocks) -> None:
    path = workdir / "config/config.yaml"
    config = yaml.safe_load(path.read_text())
    for key, value in blocks.items():
        config["datasets"]["demo"].setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_demo_vcc_from_a_challenge_csv(tmp_path):
    workdir = copy_pipeline(tmp_path, FAST_DEMO_OVERRIDES)
    first = snakemake(workdir, "-c1", "results/demo/processed.h5ad", "resources/data/demo/target_raw.h5ad")
    assert first.returncode == 0, describe_failure(first, workdir)
    raw = ad.read_h5ad(workdir / "resources/data/demo/target_raw.h5ad", backed="r")
    labels = sorted(
        {parse_condition(str(label)).canonical for label in raw.obs["target_gene"].astype(str)} - {"non-targeting"}
    )
    target_genes = [str(g) for g in raw.var_names]
    raw.file.close()
    counts = {label: 5 + 3 * i for i, label in enumerate(labels)}  # every count different
    csv = pd.DataFrame({"target_gene": list(counts), "n_cells": list(counts.values()), "median_umi_per_cell": 1000.0})
    csv.to_csv(workdir / "config/pert_counts.csv", index=False)
    _set_demo(workdir, target={"predict": "config/pert_counts.csv"})
    methods = ["ccfm"]
    if arc_state_version() is not None:
        from state_test_data import write_released_state_run

        genes = [str(g) for g in ad.read_h5ad(workdir / "results/demo/processed.h5ad", backed="r").var_names]
        singles = sorted({part for label in labels for part in label.split("+")})
        write_released_state_run(workdir / "ST-release", genes, ["non-targeting", *singles], tmp_path / "read")
        _set_demo(workdir, state={"enabled": "auto", "run_dir": str(workdir / "ST-release")})
        methods.append("state")

    result = snakemake(workdir, "-c1", "demo_vcc", "results/demo/fold1/adapt/target_summary.tsv")
    assert result.returncode == 0, describe_failure(result, workdir)
    adapt = workdir / "results/demo/fold1/adapt"
    (workdir / "genes.csv").write_text("\n".join(target_genes) + "\n")
    for method in methods:
        vcc = read_vcc(adapt / f"{method}.vcc")
        assert list(vcc.var_names) == target_genes, method
        got = vcc.obs["target_gene"].astype(str).value_counts().to_dict()
        n_controls = got.pop("non-targeting")
        assert got == counts and n_controls > 0, method
        table = pd.read_csv(adapt / f"{method}_vcc.tsv", sep="\t").iloc[0]
        assert table["n_predicted_genes"] + table["n_filled_genes"] == len(target_genes)
        assert 0 < table["n_predicted_genes"] < len(target_genes)  # the demo's target has genes outside the panel
        # cell-eval's own prep accepts the submission's matrix with the target's gene list
        vcc.write_h5ad(workdir / f"{method}_sub.h5ad")
        command = [sys.executable, "-m", "cell_eval", "prep", "-i", str(workdir / f"{method}_sub.h5ad")]
        prep = subprocess.run([*command, "-g", str(workdir / "genes.csv")], capture_output=True, text=True)
        assert prep.returncode == 0, prep.stderr[-2000:]
    assert not (tmp_path / "read").exists()  # data_module.torch was never unpickled

    summary = pd.read_csv(adapt / "target_summary.tsv", sep="\t").set_index("method")
    assert {"ccfm_adapted", "ccfm_unadapted", "nochange", "additive", "cellmean"} == set(summary.index)
    assert summary.loc["cellmean", "vcc_score"] == 0.0
    assert summary[["vcc_des", "vcc_pds", "vcc_mae", "vcc_score"]].notna().all().all()
    metrics = pd.read_csv(adapt / "target_metrics.tsv", sep="\t")
    assert set(metrics["perturbation"]) == set(counts)
    pred = ad.read_h5ad(adapt / "target_pred.h5ad", backed="r")
    got = pred.obs["target_gene"].astype(str).value_counts().to_dict()
    got.pop("non-targeting")
    assert got == counts
    assert "target context: " in result.stderr and "challenge submission: results/demo/fold1/adapt/ccfm.vcc" in (
        result.stderr
    )
