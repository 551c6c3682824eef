"""Properties of the demo simulator (ccfm.data.simulate)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ccfm.data.conditions import CONTROL
from ccfm.data.simulate import OTHER_SYMBOLS, PERTURBABLE_SYMBOLS, load_ground_truth, simulate_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return simulate_demo(tmp_path_factory.mktemp("demo"), seed=7)


def _log_norm(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _condition_means(adata: ad.AnnData) -> dict[str, np.ndarray]:
    logged = _log_norm(adata.X.toarray())
    labels = adata.obs["target_gene"].astype(str).to_numpy()
    return {label: logged[labels == label].mean(axis=0) for label in np.unique(labels)}


def test_layout_and_labels(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    truth = load_ground_truth(demo["ground_truth"])
    assert 5000 <= source.n_obs <= 8000 and source.n_vars == 300
    labels = set(source.obs["target_gene"].astype(str))
    assert CONTROL in labels
    singles = [c for c in truth["conditions"] if "+" not in c]
    doubles = [c for c in truth["conditions"] if "+" in c]
    assert 15 <= len(singles) <= 20 and 30 <= len(doubles) <= 40
    assert labels == {CONTROL, *truth["conditions"]}
    for double in doubles:
        a, b = double.split("+")
        assert a < b and a in singles and b in singles  # canonical sorted A+B
    # perturbed genes are in the panel; part of the panel is real symbols, part synthetic
    assert set(truth["perturbed_genes"]) <= set(source.var_names)
    real = truth["is_real_symbol"]
    assert real.sum() == 150 and list(truth["genes"]) == list(source.var_names)
    assert set(source.var_names[real]) <= set(PERTURBABLE_SYMBOLS) | set(OTHER_SYMBOLS)
    assert all(name.startswith("synth_g") for name in source.var_names[~real])


def test_counts_are_integer_and_overdispersed(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    counts = source.X.toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    controls = counts[source.obs["target_gene"].astype(str).to_numpy() == CONTROL]
    mean, var = controls.mean(axis=0), controls.var(axis=0)
    expressed = mean > 1
    # negative binomial: variance exceeds the Poisson variance (= mean) for nearly all genes
    assert (var[expressed] > 1.2 * mean[expressed]).mean() > 0.95
    library = counts.sum(axis=1)
    assert library.std() / library.mean() > 0.25  # per-cell library-size variation
    assert 0.05 < (counts == 0).mean() < 0.8  # sparse, as single-cell data are


def test_perturbation_propagates_downstream(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    truth = load_ground_truth(demo["ground_truth"])
    means = _condition_means(source)
    genes = list(source.var_names)
    for gene, sign in zip(truth["perturbed_genes"], truth["perturbation_sign"]):
        delta = means[gene] - means[CONTROL]
        assert np.sign(delta[genes.index(gene)]) == sign  # the target gene moves as designed
    # downstream genes: the true shift touches more genes than the perturbed one
    singles = truth["condition_type"] == "single"
    assert np.median((np.abs(truth["shifts"][singles]) > 0.1).sum(axis=1)) >= 5
    # observed and true shifts agree (correlation over all genes, averaged over singles)
    corr = [
        np.corrcoef(means[c] - means[CONTROL], s)[0, 1]
        for c, s in zip(truth["conditions"][singles], truth["shifts"][singles])
    ]
    assert np.mean(corr) > 0.5


def _residuals(source, truth):
    means = _condition_means(source)
    delta = {c: m - means[CONTROL] for c, m in means.items()}
    out = {}
    for i, (label, kind) in enumerate(zip(truth["conditions"], truth["interaction_type"])):
        if "+" in label:
            a, b = label.split("+")
            out[label] = (kind, delta[label] - delta[a] - delta[b], truth["interaction"][i])
    return out, delta


def test_doubles_are_measurably_non_additive(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    truth = load_ground_truth(demo["ground_truth"])
    residuals, _ = _residuals(source, truth)
    norms: dict[str, list[float]] = {}
    matched, mismatched = [], []
    interacting = [label for label, (kind, _, _) in residuals.items() if kind != "independent"]
    for rank, label in enumerate(interacting):
        kind, observed, recorded = residuals[label]
        other = residuals[interacting[(rank + 1) % len(interacting)]][2]
        matched.append(np.corrcoef(observed, recorded)[0, 1])
        mismatched.append(np.corrcoef(observed, other)[0, 1])
    for kind, observed, _ in residuals.values():
        norms.setdefault(kind, []).append(float(np.linalg.norm(observed)))
    assert {"same_module", "cooperating", "independent"} <= set(norms)
    # interacting pairs deviate from additive clearly more than independent ones (noise level)
    assert np.mean(norms["cooperating"]) > 1.3 * np.mean(norms["independent"])
    assert np.mean(norms["same_module"]) > 1.1 * np.mean(norms["independent"])
    # and the observed residual points along the recorded interaction, not another double's
    assert np.mean(matched) > 0.5 and np.mean(matched) > np.mean(mismatched) + 0.3
    assert np.all(np.abs(truth["interaction"][truth["condition_type"] == "single"]) == 0)


def test_interactions_follow_the_modules_and_are_discoverable(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    truth = load_ground_truth(demo["ground_truth"])
    module = dict(zip(truth["perturbed_genes"], truth["module_of"]))
    cooperating = {tuple(pair) for pair in truth["cooperating_modules"].tolist()}
    residuals, delta = _residuals(source, truth)
    for label, (kind, _, _) in residuals.items():
        a, b = label.split("+")
        pair = tuple(sorted((int(module[a]), int(module[b]))))
        expected = "same_module" if pair[0] == pair[1] else "cooperating" if pair in cooperating else "independent"
        assert kind == expected, label
    # singles of one module share a programme: their observed responses correlate more (in
    # either direction: a knock-down moves the programme the other way)
    genes = list(truth["perturbed_genes"])
    same, other = [], []
    for i, a in enumerate(genes):
        for b in genes[i + 1 :]:
            (same if module[a] == module[b] else other).append(abs(np.corrcoef(delta[a], delta[b])[0, 1]))
    assert np.mean(same) > np.mean(other) + 0.3
    # module members co-vary in control cells
    controls = _log_norm(source.X.toarray())[source.obs["target_gene"].astype(str).to_numpy() == CONTROL]
    index = {g: i for i, g in enumerate(source.var_names)}
    corr = np.corrcoef(controls[:, [index[g] for g in genes]].T)
    same_c = [
        corr[i, j] for i in range(len(genes)) for j in range(i + 1, len(genes)) if module[genes[i]] == module[genes[j]]
    ]
    other_c = [
        corr[i, j] for i in range(len(genes)) for j in range(i + 1, len(genes)) if module[genes[i]] != module[genes[j]]
    ]
    assert np.mean(same_c) > np.mean(other_c) + 0.05


def test_random_interaction_model_stays_available(tmp_path: Path) -> None:
    paths = simulate_demo(tmp_path, seed=5, interaction_model="random", n_doubles=30)
    truth = load_ground_truth(paths["ground_truth"])
    kinds = set(truth["interaction_type"][truth["condition_type"] == "double"])
    assert kinds <= {"additive", "synergy", "buffering", "epistasis"} and len(kinds) >= 3
    assert truth["module_of"].size == 0
    with pytest.raises(ValueError, match="interaction_model"):
        simulate_demo(tmp_path / "x", seed=1, interaction_model="modules")


def test_target_context_is_shifted(demo) -> None:
    source = ad.read_h5ad(demo["raw"])
    target = ad.read_h5ad(demo["target_raw"])
    truth = load_ground_truth(demo["ground_truth"])
    assert list(target.var_names) == list(source.var_names)
    assert 2000 <= target.n_obs <= 3000
    observed = set(target.obs["target_gene"].astype(str)) - {CONTROL}
    assert observed == set(truth["target_conditions"]) and 0 < len(observed) < len(truth["conditions"])
    shift = _condition_means(target)[CONTROL] - _condition_means(source)[CONTROL]
    assert np.corrcoef(shift, truth["target_baseline_shift"])[0, 1] > 0.8


def test_seed_determinism_and_overrides(tmp_path: Path) -> None:
    sizes = dict(
        n_genes=120,
        n_real_symbols=60,
        n_singles=6,
        n_doubles=5,
        n_control_cells=100,
        cells_per_condition=10,
        n_target_control_cells=50,
        n_target_singles=2,
        n_target_doubles=1,
        target_cells_per_condition=10,
    )
    first = simulate_demo(tmp_path / "a", seed=3, **sizes)
    second = simulate_demo(tmp_path / "b", seed=3, **sizes)
    third = simulate_demo(tmp_path / "c", seed=4, **sizes)
    for key in ("raw", "target_raw"):
        x, y, z = (ad.read_h5ad(p[key]) for p in (first, second, third))
        assert (x.X != y.X).nnz == 0
        assert x.obs.equals(y.obs) and list(x.var_names) == list(y.var_names)
        assert (x.X != z.X).nnz > 0
    truth_a, truth_b = load_ground_truth(first["ground_truth"]), load_ground_truth(second["ground_truth"])
    assert truth_a.keys() == truth_b.keys()
    assert all(np.array_equal(truth_a[k], truth_b[k]) for k in truth_a)
    assert ad.read_h5ad(first["raw"]).n_obs == 100 + 11 * 10
    with pytest.raises(ValueError, match="unknown simulate option"):
        simulate_demo(tmp_path / "d", seed=1, n_cells=5)
    with pytest.raises(ValueError, match="n_doubles"):
        simulate_demo(tmp_path / "e", seed=1, n_singles=3, n_doubles=10)
