"""MMD shift adaptation (ccfm.adapt: shift, files, target, score): estimator, bandwidths, shift recovery, determinism,
sparse-aware batching, shift files, and the rule entry points on a tiny model."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ccfm.adapt.adaptable import ModelSpec, load_adaptable
from ccfm.adapt.ccfm_model import target_labels_to_predict
from ccfm.adapt.files import AdaptInputs, ShiftFiles, adapt_to_files, align_shift, load_shift, save_shift
from ccfm.adapt.score import TARGET_METHODS, TargetScoreFiles, TargetScoreSettings, score_target_to_files
from ccfm.adapt.shift import AdaptSettings, CSRRowSource, learn_shift, model_control_encoder
from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files
from ccfm.evaluate.plots import plot_adapt_history
from ccfm.model.mmd import bandwidths_from_median, median_distance, mmd2_unbiased, multiscale_rbf_mmd

N_GENES, N_FEATURES = 20, 32


# ---------------------------------------------------------------------------------------------
# Synthetic data: target = fresh source-like cells + a known per-gene offset
# ---------------------------------------------------------------------------------------------


def _cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """log1p-like positive expression with a few zeros (so the CSR is really sparse-ish)."""
    values = rng.gamma(4.0, 0.5, size=(n, N_GENES))
    return (values * (rng.random((n, N_GENES)) > 0.05)).astype(np.float32)


@pytest.fixture(scope="module")
def offset_problem():
    rng = np.random.default_rng(0)
    offset = rng.uniform(-0.6, 0.6, N_GENES).astype(np.float32)
    source = _cells(rng, 800)
    target = np.maximum(_cells(rng, 800) + offset, 0.0)
    return offset, sp.csr_matrix(source), sp.csr_matrix(target)


def _identity_like_encoder(seed: int = 1):
    """Injective map: full-column-rank linear map (20 -> 32) then tanh (strictly monotone)."""
    weight = torch.randn(N_GENES, N_FEATURES, generator=torch.Generator().manual_seed(seed)) / N_GENES**0.5
    return lambda x: torch.tanh(x @ weight)


FAST = AdaptSettings(steps=300, lr=0.05, batch_size=128, holdout_fraction=0.3, eval_every=20, patience=5)


# ---------------------------------------------------------------------------------------------
# Estimator and bandwidths
# ---------------------------------------------------------------------------------------------


def _mmd2_by_loops(x: torch.Tensor, y: torch.Tensor, sigmas) -> float:
    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5,
    )
    sigmas = (0.5, 1.0, 2.0)
    assert float(mmd2_unbiased(x, y, sigmas)) == pytest.approx(_mmd2_by_loops(x, y, sigmas), rel=1e-9, abs=1e-12)


def test_mmd_separates_shifted_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    same = float(multiscale_rbf_mmd(a, b))
    shifted = float(multiscale_rbf_mmd(a, b + 1.0))
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)


def test_bandwidth_never_collapses_on_duplicated_points() -> None:
    identical = torch.ones(50, 6)
    median = median_distance(identical)
    assert np.isfinite(median) and median > 0
    sigmas = bandwidths_from_median(median)
    assert all(np.isfinite(s) and s > 0 for s in sigmas)
    value = float(multiscale_rbf_mmd(identical, identical.clone()))
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-6)
    # Mostly duplicates (median of all pairs is 0): the distinct pairs set the scale instead.
    mostly = torch.cat([torch.zeros(40, 2), torch.tensor([[3.0, 4.0]] * 10)])
    assert median_distance(mostly) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="> 0"):
        bandwidths_from_median(0.0)


def test_mmd_needs_two_points_per_side() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(torch.zeros(1, 3), torch.zeros(4, 3), (1.0,))


# ---------------------------------------------------------------------------------------------
# Sparse-aware batches
# ---------------------------------------------------------------------------------------------


def test_csr_row_source_matches_dense_rows_including_duplicates() -> None:
    rng = np.random.default_rng(3)
    matrix = sp.random(30, 9, density=0.3, format="csr", random_state=4, dtype=np.float32)
    # Non-canonical CSR: row 0 stores column 1 twice; the values must be summed, as scipy does.
    duplicated = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([1, 1, 4]), np.array([0, 2, 3])), shape=(2, 5))
    assert not duplicated.has_canonical_format
    rows = rng.integers(0, 30, 12)
    np.testing.assert_allclose(CSRRowSource(matrix).read_rows(rows), matrix.toarray()[rows], rtol=0, atol=0)
    np.testing.assert_allclose(CSRRowSource(duplicated).read_rows(np.array([1, 0, 0])), duplicated.toarray()[[1, 0, 0]])
    assert CSRRowSource(matrix).read_rows(np.array([], dtype=int)).shape == (0, 9)


class _NoDensify(sp.csr_matrix):
    """A CSR matrix that refuses to become dense as a whole."""

    def toarray(self, *args, **kwargs):
        raise AssertionError("the whole target matrix was densified")

    todense = toarray
    __array__ = toarray


def test_learner_never_densifies_and_batches_stay_small(offset_problem) -> None:
    _, source, target = offset_problem
    encoder = _identity_like_encoder()
    seen_batch_rows: list[int] = []

    def spying_encoder(x: torch.Tensor) -> torch.Tensor:
        seen_batch_rows.append(x.shape[0])
        return encoder(x)

    settings = dataclasses.replace(FAST, steps=40, batch_size=64)
    result = learn_shift(spying_encoder, _NoDensify(target), _NoDensify(source), settings, seed=0, progress=False)
    assert result.shift.shape == (N_GENES,)
    assert max(seen_batch_rows) <= 64


# ---------------------------------------------------------------------------------------------
# Learning the shift
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(offset_problem):
    _, source, target = offset_problem
    return learn_shift(_identity_like_encoder(), target, source, FAST, seed=0, progress=False)


def test_shift_recovers_the_negative_offset(offset_problem, learned) -> None:
    offset = offset_problem[0]
    correlation = np.corrcoef(learned.shift.numpy(), -offset)[0, 1]
    assert correlation > 0.9, f"learned shift correlates {correlation:.3f} with -offset"
    assert np.abs(learned.shift.numpy() + offset).mean() < 0.5 * np.abs(offset).mean()


def test_heldout_mmd_drops_after_adaptation(offset_problem, learned) -> None:
    # The reported numbers are on the *test* part: early stopping selects on validation (where
    # "after <= before" holds by construction, step 0 being a candidate), so the test part must be
    # other cells, giving other values, and its MMD² must fall on its own.
    assert learned.mmd_after < 0.3 * learned.mmd_before
    assert learned.mmd_before != learned.val_mmd_before and learned.mmd_after != learned.val_mmd_after
    assert learned.val_mmd_after <= learned.val_mmd_before
    # And on fresh cells that learn_shift never saw (same source / target laws, same kernel).
    offset = offset_problem[0]
    rng = np.random.default_rng(99)
    fresh_source = torch.from_numpy(_cells(rng, 300))
    fresh_target = torch.from_numpy(np.maximum(_cells(rng, 300) + offset, 0.0))
    encoder = _identity_like_encoder()
    z_source = encoder(fresh_source)
    before = float(mmd2_unbiased(encoder(fresh_target), z_source, learned.bandwidths))
    after = float(mmd2_unbiased(encoder((fresh_target + learned.shift).clamp_min(0.0)), z_source, learned.bandwidths))
    assert after < 0.3 * before, f"fresh held-out MMD² {before:.4g} -> {after:.4g}"
    assert learned.best_step > 0 and learned.history[0]["step"] == 0
    assert learned.n_cells["target_train"] + learned.n_cells["target_val"] + learned.n_cells["target_test"] == 800


def test_same_seed_same_shift_different_seed_different_path(offset_problem, learned) -> None:
    _, source, target = offset_problem
    short = dataclasses.replace(FAST, steps=60)
    first = learn_shift(_identity_like_encoder(), target, source, short, seed=7, progress=False)
    again = learn_shift(_identity_like_encoder(), target, source, short, seed=7, progress=False)
    other = learn_shift(_identity_like_encoder(), target, source, short, seed=8, progress=False)
    assert torch.equal(first.shift, again.shift)
    assert [h["val_mmd"] for h in first.history] == [h["val_mmd"] for h in again.history]
    assert [h["train_mmd"] for h in first.history[1:]] == [h["train_mmd"] for h in again.history[1:]]
    assert not torch.equal(first.shift, other.shift)
    assert [h["val_mmd"] for h in first.history] != [h["val_mmd"] for h in other.history]


def test_clear_errors_for_mismatched_or_tiny_inputs(offset_problem) -> None:
    _, source, target = offset_problem
    with pytest.raises(ValueError, match="same genes"):
        learn_shift(_identity_like_encoder(), target[:, :10], source, FAST, progress=False)
    with pytest.raises(ValueError, match="too few"):
        learn_shift(_identity_like_encoder(), target[:5], source, FAST, progress=False)
    with pytest.raises(TypeError, match="CSR matrix, a numpy array or a RowSource"):
        learn_shift(_identity_like_encoder(), [[1.0]], source, FAST, progress=False)
    with pytest.raises(ValueError, match="unknown key.*under 'adapt'"):
        AdaptSettings.from_mapping({"step": 3})
    with pytest.raises(ValueError, match="encoding"):
        AdaptSettings.from_mapping({"encoding": "mean"})


# ---------------------------------------------------------------------------------------------
# Shift files
# ---------------------------------------------------------------------------------------------


def test_shift_file_roundtrip_keeps_gene_order(tmp_path) -> None:
    genes = ["B", "A", "C"]
    shift = torch.tensor([0.5, -1.0, 2.0])
    path = tmp_path / "shift.safetensors"
    save_shift(path, shift, genes, {"seed": 3})
    loaded, loaded_genes, metadata = load_shift(path)
    assert torch.equal(loaded, shift) and loaded_genes == genes and metadata == {"seed": 3}
    assert torch.equal(align_shift(loaded, loaded_genes, ["A", "B", "C"]), torch.tensor([-1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="no value"):
        align_shift(loaded, loaded_genes, ["A", "Z"])
    with pytest.raises(ValueError, match="does not match"):
        save_shift(path, shift, ["A"])
    assert [p.name for p in tmp_path.iterdir()] == ["shift.safetensors"]  # no temp file left


# ---------------------------------------------------------------------------------------------
# The model's encoder and the rule entry points on a tiny untrained model
# ---------------------------------------------------------------------------------------------

GENES = [f"G{i}" for i in range(12)]


def _processed(rng: np.random.Generator, labels: list[str], offset: np.ndarray) -> ad.AnnData:
    x = np.log1p(rng.poisson(3.0, size=(len(labels), len(GENES))).astype(np.float32))
    x = np.maximum(x + offset, 0.0).astype(np.float32)
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ccfm.data.perturbations import PerturbationVocab
    from ccfm.model.checkpoint import save_model
    from ccfm.model.training import build_denoiser

    root = tmp_path_factory.mktemp("adapt_run")
    rng = np.random.default_rng(5)
    source_labels = ["non-targeting"] * 120 + ["G1"] * 20 + ["G2"] * 20 + ["G1+G2"] * 20
    target_labels = ["non-targeting"] * 100 + ["G1"] * 15 + ["G1+G2"] * 15 + ["G11"] * 15
    _processed(rng, source_labels, np.zeros(len(GENES))).write_h5ad(root / "processed.h5ad")
    _processed(rng, target_labels, rng.uniform(-0.5, 0.5, len(GENES))).write_h5ad(root / "target.h5ad")
    vocab = PerturbationVocab.for_genes(GENES)
    denoiser = build_denoiser(len(GENES), {"d_model": 16, "nhead": 2, "nlayers": 1}, {}, 0, vocab, seed=0)
    save_model(root / "model.pt", denoiser, vocab)
    return root


def test_model_control_encoder_is_differentiable_and_frozen(tiny_run) -> None:
    from ccfm.model.checkpoint import load_model

    model = load_model(tiny_run / "model.pt").denoiser.model
    x = torch.rand(5, len(GENES), requires_grad=True)
    pooled = model_control_encoder(model, encoding="pooled")(x)
    tokens = model_control_encoder(model)(x)
    assert pooled.shape == (5, 16) and tokens.shape == (5, len(GENES), 16)
    pooled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="encoding"):
        model_control_encoder(model, encoding="mean")


def test_rule_entry_points_write_contract_files(tiny_run) -> None:
    root = tiny_run
    out = root / "adapt"
    settings = AdaptSettings(
        steps=30, lr=0.05, batch_size=32, holdout_fraction=0.3, eval_every=10, patience=3, encoding="tokens"
    )
    result = adapt_to_files(
        load_adaptable(ModelSpec("ccfm", root / "model.pt", device="cpu")),
        AdaptInputs(root / "processed.h5ad", root / "target.h5ad"),
        ShiftFiles(out / "shift.safetensors", out / "mmd.tsv", out / "history.tsv"),
        settings,
        seed=1,
    )
    shift, genes, metadata = load_shift(out / "shift.safetensors")
    assert genes == GENES and torch.equal(shift, result.shift) and metadata["encoding"] == "tokens"
    table = pd.read_csv(out / "mmd.tsv", sep="\t")
    assert list(table["heldout_part"]) == ["test", "validation"] and np.isfinite(table["mmd2_after"]).all()
    plot_adapt_history(out / "history.tsv", out / "history.png", "tiny")
    assert (out / "history.png").stat().st_size > 1000

    generate = dict(cells_per_perturbation=6, latent_steps=2, expr_steps=2, batch_size=4, method="euler")
    paths = [
        out / n
        for n in (
            "target_pred.h5ad",
            "target_pred_means.csv",
            "target_pred_unadapted.h5ad",
            "target_pred_unadapted_means.csv",
        )
    ]
    model = load_adaptable(ModelSpec("ccfm", root / "model.pt", generate, device="cpu"))
    outputs = TargetPredictionFiles(*paths)
    labels = predict_target_to_files(model, root / "target.h5ad", out / "shift.safetensors", outputs, seed=1)
    assert labels == ["G1", "G1+G2", "G11"]
    pred = ad.read_h5ad(paths[0])
    assert list(pred.var_names) == GENES
    counts = pred.obs["target_gene"].value_counts()
    assert counts["non-targeting"] == 100 and counts["G1+G2"] == 6
    # Controls in the file are the real, unshifted target controls.
    target = ad.read_h5ad(root / "target.h5ad")
    real_controls = target.X[np.flatnonzero(target.obs["target_gene"] == "non-targeting")].toarray()
    np.testing.assert_allclose(pred[pred.obs["target_gene"] == "non-targeting"].X.toarray(), real_controls)
    means = pd.read_csv(paths[1], index_col=0)
    assert list(means.index) == labels and list(means.columns) == GENES
    unadapted = ad.read_h5ad(paths[2])
    assert not np.allclose(pred.X.toarray()[:18], unadapted.X.toarray()[:18])

    summary = score_target_to_files(
        TargetScoreFiles(
            root / "target.h5ad",
            root / "processed.h5ad",
            paths[0],
            paths[2],
            out / "target_metrics.tsv",
            out / "target_summary.tsv",
        ),
        TargetScoreSettings(n_cells=6, seed=1, cell_eval_profile=None),
    )
    assert list(summary["method"]) == list(TARGET_METHODS)
    metrics = pd.read_csv(out / "target_metrics.tsv", sep="\t")
    assert set(metrics["perturbation"]) == {"G1", "G1+G2", "G11"}
    # G11 has no source single: its additive baseline falls back to no change.
    by = metrics.set_index(["method", "perturbation"])["mse"]
    assert by[("additive", "G11")] == pytest.approx(by[("nochange", "G11")])


def test_requested_target_labels_must_be_embeddable() -> None:
    from ccfm.data.perturbations import PerturbationVocab

    vocab = PerturbationVocab.for_genes(GENES)
    assert target_labels_to_predict(["non-targeting", "G3", "NOPE"], [], vocab) == ["G3"]
    assert target_labels_to_predict([], ["G2+G1"], vocab) == ["G1+G2"]
    with pytest.raises(KeyError, match="NOPE"):
        target_labels_to_predict([], ["NOPE"], vocab)
    with pytest.raises(ValueError, match="no target perturbation"):
        target_labels_to_predict(["non-targeting", "NOPE"], [], vocab)


@pytest.mark.gpu
def test_mmd_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(128, 16, generator=g, dtype=torch.float64),
        torch.randn(96, 16, generator=g, dtype=torch.float64) + 0.5,
    )
    cpu = multiscale_rbf_mmd(x, y)
    cuda = multiscale_rbf_mmd(x.cuda(), y.cuda())
    assert cuda.device.type == "cuda"
    assert cuda.item() == pytest.approx(cpu.item(), rel=1e-9, abs=1e-12)
