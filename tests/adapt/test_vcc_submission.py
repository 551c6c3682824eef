"""From target predictions to a Virtual Cell Challenge submission (ccfm.adapt.requests, .submission, .sources,
and the challenge score in ccfm.adapt.score): the challenge CSV, gene filling, cell-eval prep, the score."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.adapt.requests import control_rows_per_label, read_predict_csv, target_requests
from ccfm.adapt.submission import (
    SubmissionFiles,
    SubmissionSettings,
    fill_outside_panel,
    read_vcc,
    write_vcc_submission,
)

PANEL = [f"G{i}" for i in range(12)]
EXTRA = [f"X{i}" for i in range(7)]  # target genes outside the model's panel


# ---------------------------------------------------------------------------------------------
# The challenge's perturbation CSV
# ---------------------------------------------------------------------------------------------


def test_predict_csv_gives_labels_and_counts_and_drops_the_control(tmp_path) -> None:
    path = tmp_path / "pert_counts_Validation.csv"
    path.write_text(
        "target_gene,n_cells,median_umi_per_cell\nG1,7,5000.5\nnon-targeting,100,4000\nG2+G1,3,5100\nG11,5,4800\n"
    )
    requests = read_predict_csv(path)
    assert requests.labels == ["G1", "G1+G2", "G11"]
    assert requests.n_cells == {"G1": 7, "G1+G2": 3, "G11": 5}
    assert target_requests(str(path)).n_cells == requests.n_cells
    assert target_requests(["G2+G1", "G1"]).labels == ["G1+G2", "G1"]
    assert target_requests(["G1"]).n_cells == {}
    (tmp_path / "no_counts.csv").write_text("target_gene\nG1\nG3\n")
    assert read_predict_csv(tmp_path / "no_counts.csv").n_cells == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gene,n_cells\nG1,3\n", "no target_gene column"),
        ("target_gene,n_cells\nG1,0\n", "positive whole number"),
        ("target_gene,n_cells\nG1,2.5\n", "positive whole number"),
        ("target_gene,n_cells\nG1,2\nG1,3\n", "more than once"),
    ],
)
def test_bad_predict_csv_is_refused_with_the_reason(tmp_path, text, message) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_predict_csv(path)
    with pytest.raises(FileNotFoundError, match="target.predict"):
        read_predict_csv(tmp_path / "missing.csv")


def test_requested_labels_come_first_then_every_observed_one() -> None:
    from ccfm.adapt.ccfm_model import target_labels_to_predict
    from ccfm.data.perturbations import PerturbationVocab

    vocab = PerturbationVocab.for_genes(PANEL)
    observed = ["non-targeting", "G3", "G1", "NOPE"]
    assert target_labels_to_predict(observed, ["G2+G5", "G1"], vocab) == ["G2+G5", "G1", "G3"]


def test_per_label_control_draws_match_the_single_count_draw() -> None:
    from ccfm.evaluate.baselines import sample_control_rows

    same = control_rows_per_label(50, ["A", "B"], {"A": 4, "B": 4}, seed=3)
    reference = sample_control_rows(50, ["A", "B"], 4, 3)
    assert all(np.array_equal(same[k], reference[k]) for k in reference)
    mixed = control_rows_per_label(50, ["A", "B", "C"], {"A": 2, "B": 9, "C": 2}, seed=3)
    assert {k: v.size for k, v in mixed.items()} == {"A": 2, "B": 9, "C": 2}


# ---------------------------------------------------------------------------------------------
# The gene-filling rule
# ---------------------------------------------------------------------------------------------


def test_genes_outside_the_panel_are_filled_from_the_control_cells() -> None:
    rng = np.random.default_rng(0)
    panel = ["G0", "G1", "G2", "GONE"]  # GONE: a panel gene the target file lacks
    target = ["X0", "G2", "X1", "G0", "G1"]  # target order, two genes outside the panel
    predicted = rng.uniform(0.5, 2.0, size=(3, len(panel))).astype(np.float32)
    controls = sp.csr_matrix(rng.uniform(0.0, 1.0, size=(3, len(target))).astype(np.float32))
    out = fill_outside_panel(predicted, panel, target, controls).toarray()
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(out[:, [3, 4, 1]], predicted[:, [0, 1, 2]])  # panel genes: the prediction
    np.testing.assert_array_equal(out[:, [0, 2]], controls.toarray()[:, [0, 2]])  # others: the control cell's
    with pytest.raises(ValueError, match="do not match"):
        fill_outside_panel(predicted, panel, target, controls[:2])


# ---------------------------------------------------------------------------------------------
# Prediction -> .vcc -> score on a tiny model
# ---------------------------------------------------------------------------------------------


def _counts(rng, n: int, n_genes: int, offset: float = 0.0) -> np.ndarray:
    return rng.poisson(3.0 + offset, size=(n, n_genes)).astype(np.float32)


@pytest.fixture(scope="module")
def vcc_run(tmp_path_factory):
    from ccfm.data.perturbations import PerturbationVocab
    from ccfm.data.preprocess import TargetSettings, preprocess_target
    from ccfm.model.checkpoint import save_model
    from ccfm.model.training import build_denoiser

    root = tmp_path_factory.mktemp("vcc_run")
    rng = np.random.default_rng(11)
    source_labels = ["non-targeting"] * 80 + ["G1"] * 20 + ["G2"] * 20 + ["G3"] * 20
    x = np.log1p(_counts(rng, len(source_labels), len(PANEL)))
    obs = pd.DataFrame({"target_gene": pd.Categorical(source_labels)}, index=[f"s{i}" for i in range(len(x))])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=PANEL)).write_h5ad(root / "processed.h5ad")
    # The target file: raw counts on the panel genes plus genes outside it, in an order of its own.
    target_genes = ["X0", "G3", "X1", "G0", "G1", "X2", "G2", *PANEL[4:], *EXTRA[3:]]
    target_labels = ["non-targeting"] * 60 + ["G1"] * 12 + ["G2"] * 12 + ["G3"] * 12 + ["G1+G2"] * 12
    counts = _counts(rng, len(target_labels), len(target_genes), offset=0.5)
    obs = pd.DataFrame({"target_gene": pd.Categorical(target_labels)}, index=[f"t{i}" for i in range(len(counts))])
    raw = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=target_genes))
    raw.write_h5ad(root / "target_raw.h5ad")
    preprocess_target(
        root / "target_raw.h5ad", root / "processed.h5ad", root / "target.h5ad", TargetSettings(dataset="tiny")
    )
    vocab = PerturbationVocab.for_genes(PANEL)
    denoiser = build_denoiser(len(PANEL), {"d_model": 16, "nhead": 2, "nlayers": 1}, {}, 0, vocab, seed=0)
    save_model(root / "model.pt", denoiser, vocab)
    (root / "perts.csv").write_text(
        "target_gene,n_cells,median_umi_per_cell\nG1,5,100\nG2,9,100\nG3,4,100\nG1+G2,6,100\n"
    )
    return root


def _predict(root):
    import torch

    from ccfm.adapt.adaptable import ModelSpec, load_adaptable
    from ccfm.adapt.files import save_shift
    from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files

    out = root / "adapt"
    save_shift(out / "shift.safetensors", torch.full((len(PANEL),), 0.1), PANEL)
    generate = dict(cells_per_perturbation=3, latent_steps=2, expr_steps=2, batch_size=4, method="euler")
    model = load_adaptable(ModelSpec("ccfm", root / "model.pt", generate, device="cpu"))
    paths = [out / n for n in ("pred.h5ad", "pred_means.csv", "unadapted.h5ad", "unadapted_means.csv")]
    labels = predict_target_to_files(
        model,
        root / "target.h5ad",
        out / "shift.safetensors",
        TargetPredictionFiles(*paths),
        requested=str(root / "perts.csv"),
        seed=1,
    )
    return labels, paths


@pytest.fixture(scope="module")
def predicted(vcc_run):
    return _predict(vcc_run)


def test_target_predictions_have_the_csvs_cell_counts(vcc_run, predicted) -> None:
    labels, paths = predicted
    assert labels == ["G1", "G2", "G3", "G1+G2"]
    for path in (paths[0], paths[2]):
        counts = ad.read_h5ad(path).obs["target_gene"].astype(str).value_counts().to_dict()
        assert counts == {"G1": 5, "G2": 9, "G3": 4, "G1+G2": 6, "non-targeting": 60}


def _cell_eval_prep(h5ad, genes_csv, out) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cell_eval", "prep", "-i", str(h5ad), "-g", str(genes_csv), "-o", str(out)]
    return subprocess.run(command, capture_output=True, text=True)


def test_vcc_file_covers_every_target_gene_and_passes_cell_eval_prep(vcc_run, predicted, tmp_path) -> None:
    _, paths = predicted
    out = vcc_run / "adapt"
    summary = write_vcc_submission(
        SubmissionFiles(
            paths[0], vcc_run / "target_raw.h5ad", vcc_run / "target.h5ad", out / "ccfm.vcc", out / "ccfm_vcc.tsv"
        ),
        SubmissionSettings(method="ccfm", seed=1),
    )
    raw = ad.read_h5ad(vcc_run / "target_raw.h5ad")
    target_genes = list(raw.var_names)
    assert (summary.n_target_genes, summary.n_predicted_genes, summary.n_filled_genes) == (len(target_genes), 12, 7)
    table = pd.read_csv(out / "ccfm_vcc.tsv", sep="\t")
    assert table.loc[0, "n_filled_genes"] == 7 and table.loc[0, "n_predicted_genes"] == 12

    vcc = read_vcc(out / "ccfm.vcc")
    assert list(vcc.var_names) == target_genes
    assert vcc.obs["target_gene"].astype(str).value_counts().to_dict() == {
        "G1": 5, "G2": 9, "G3": 4, "G1+G2": 6, "non-targeting": 60,
    }  # fmt: skip
    assert vcc.X.dtype == np.float32
    # Panel genes: the adapted prediction, cell for cell; controls: the target's, normalised as preprocessed.
    pred = ad.read_h5ad(paths[0])
    for label in ("G2", "G1+G2"):
        mine = vcc[vcc.obs["target_gene"] == label]
        theirs = pred[pred.obs["target_gene"] == label]
        np.testing.assert_allclose(mine[:, PANEL].X.toarray(), np.asarray(theirs.X.todense()), rtol=1e-6)
    processed_target = ad.read_h5ad(vcc_run / "target.h5ad")
    target_controls = processed_target[processed_target.obs["target_gene"] == "non-targeting"]
    vcc_controls = vcc[vcc.obs["target_gene"] == "non-targeting"]
    np.testing.assert_allclose(vcc_controls[:, PANEL].X.toarray(), target_controls.X.toarray(), rtol=1e-5, atol=1e-6)
    # Genes outside the panel: each predicted cell carries one target control cell's values for them.
    outside = [g for g in target_genes if g not in PANEL]
    control_rows = {tuple(np.round(r, 5)) for r in vcc_controls[:, outside].X.toarray()}
    filled = vcc[vcc.obs["target_gene"] != "non-targeting"][:, outside].X.toarray()
    assert all(tuple(np.round(r, 5)) in control_rows for r in filled)
    assert len({tuple(r) for r in filled}) > 1  # drawn per cell, not one profile for all

    # cell-eval's own prep (its CLI) accepts the submitted matrix with the target's gene list.
    h5ad, genes_csv = tmp_path / "sub.h5ad", tmp_path / "genes.csv"
    vcc.write_h5ad(h5ad)
    genes_csv.write_text("\n".join(target_genes) + "\n")
    result = _cell_eval_prep(h5ad, genes_csv, tmp_path / "x.vcc")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "x.vcc").stat().st_size > 0
    # and refuses a gene list the file does not match
    genes_csv.write_text("\n".join(target_genes[:-1]) + "\n")
    bad = _cell_eval_prep(h5ad, genes_csv, tmp_path / "y.vcc")
    assert bad.returncode != 0


def test_challenge_score_of_adapted_unadapted_and_baselines(vcc_run, predicted) -> None:
    from ccfm.adapt.score import TARGET_METHODS, TargetScoreFiles, TargetScoreSettings, score_target_to_files

    _, paths = predicted
    out = vcc_run / "adapt"
    summary = score_target_to_files(
        TargetScoreFiles(
            vcc_run / "target.h5ad", vcc_run / "processed.h5ad", paths[0], paths[2],
            out / "target_metrics.tsv", out / "target_summary.tsv",
        ),
        TargetScoreSettings(n_cells=3, seed=1, cell_eval_profile="vcc"),
    )  # fmt: skip
    assert list(summary["method"]) == list(TARGET_METHODS)
    by = summary.set_index("method")
    # the baseline scores 0 against itself; everything is on cell-eval's scale
    assert by.loc["cellmean", "vcc_score"] == 0.0
    assert by.loc["cellmean", "vcc_mae"] == pytest.approx(by.loc["ccfm_adapted", "vcc_mae_baseline"])
    for method in TARGET_METHODS:
        row = by.loc[method]
        assert 0.0 <= row["vcc_score"] <= 1.0
        assert row["vcc_score"] == pytest.approx(
            np.mean([row["vcc_des_scaled"], row["vcc_pds_scaled"], row["vcc_mae_scaled"]])
        )
        assert row["vcc_mae_scaled"] == pytest.approx(max(0.0, 1 - row["vcc_mae"] / row["vcc_mae_baseline"]))
    metrics = pd.read_csv(out / "target_metrics.tsv", sep="\t")
    assert set(metrics["method"]) == set(TARGET_METHODS)


def test_extra_source_files_add_their_control_cells(vcc_run, tmp_path) -> None:
    from ccfm.adapt.sources import read_source_controls

    rng = np.random.default_rng(2)
    genes = ["G5", "G0", "OTHER", *PANEL[1:5]]  # 5 of 12 panel genes missing (zero), another order, raw counts
    counts = _counts(rng, 30, len(genes))
    labels = ["ctrl"] * 10 + ["G1"] * 20
    obs = pd.DataFrame({"guide": pd.Categorical(labels)}, index=[f"e{i}" for i in range(30)])
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "extra.h5ad")
    pooled = read_source_controls(
        vcc_run / "processed.h5ad", [tmp_path / "extra.h5ad"], perturbation_column="guide", control_label="ctrl"
    )
    assert pooled.matrix.shape == (80 + 10, len(PANEL)) and pooled.genes == PANEL
    extra = pooled.matrix[80:].toarray()
    expected = np.log1p(counts[:10] / counts[:10].sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(extra[:, PANEL.index("G5")], expected[:, 0], rtol=1e-5)
    np.testing.assert_allclose(extra[:, PANEL.index("G3")], expected[:, genes.index("G3")], rtol=1e-5)
    assert not extra[:, [PANEL.index(g) for g in PANEL if g not in genes]].any()
    obs["guide"] = pd.Categorical(["NEG"] * 10 + ["G1"] * 20)  # controls labelled NEG: the dataset's label is needed
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "nt.h5ad")
    with pytest.raises(ValueError, match="no control cells"):
        read_source_controls(vcc_run / "processed.h5ad", [tmp_path / "nt.h5ad"], perturbation_column="guide")
    found = read_source_controls(
        vcc_run / "processed.h5ad", [tmp_path / "nt.h5ad"], perturbation_column="guide", control_label="NEG"
    )
    assert found.matrix.shape[0] == 90


def test_dataset_names_ending_in_vcc_are_refused() -> None:
    from pathlib import Path

    import yaml

    from ccfm.config import ConfigError, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config/config.yaml").read_text())
    config["datasets"]["demo_vcc"] = config["datasets"].pop("demo")
    config["run"] = ["demo_vcc"]
    with pytest.raises(ConfigError, match="'demo_vcc' .* ends in '_vcc'.*target rule"):
        validate_config(config)
