"""Running statistics of scGPT features, latent normalisation, and fold-safe calibration."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from ccfm.data.moments import RunningMoments
from ccfm.scgpt.calibration import (
    LatentStats,
    add_features,
    calibrate,
    choose_calibration_cells,
    training_cell_indices,
)
from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
from scgpt_test_data import random_vocab_ids, write_log1p_h5ad

G, N = 60, 40
LABELS = ["non-targeting", "A", "B", "A+B", "C+D"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    counts = np.where(rng.random((N, G)) < 0.4, rng.poisson(3.0, (N, G)), 0)
    labels = [LABELS[i % 5] for i in range(N)]
    return write_log1p_h5ad(tmp_path_factory.mktemp("data") / "processed.h5ad", counts, labels)


@pytest.fixture(scope="module")
def extractor(tiny_scgpt_checkpoint) -> ScGPTFeatureExtractor:
    return ScGPTFeatureExtractor(
        tiny_scgpt_checkpoint(seed=5),
        random_vocab_ids(G, seed=1, unmapped=range(4)),
        settings=ExtractorSettings(seed=4, max_tokens_per_cell=None, zero_tokens=False),
    )


def test_running_stats_match_all_at_once_and_ignore_batching():
    data = torch.randn(1000, 8, dtype=torch.float64) * torch.linspace(0.1, 50, 8) + 1e3
    reference_mean, reference_var = data.mean(0), data.var(0, unbiased=False)
    for cut in (1, 7, 128, 1000):
        stats = RunningMoments.empty(8)
        for start in range(0, 1000, cut):
            add_features(stats, data[start : start + cut])
        torch.testing.assert_close(torch.from_numpy(stats.mean), reference_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.from_numpy(stats.variance(ddof=0)), reference_var, rtol=1e-9, atol=1e-9)
    left, right = RunningMoments.empty(8), RunningMoments.empty(8)
    add_features(left, data[:300])
    add_features(right, data[300:])
    left.merge(right)
    assert left.n == 1000
    torch.testing.assert_close(torch.from_numpy(left.variance(ddof=0)), reference_var, rtol=1e-9, atol=1e-9)


def test_normalize_is_invertible_and_leaves_uncovered_positions_zero():
    stats = LatentStats(mean=torch.tensor([1.0, -2.0, 0.5]), var=torch.tensor([4.0, 0.25, 1.0]), target_std=0.5)
    z = torch.randn(2, 5, 3) * 3
    covered = torch.tensor([[True, False, True, True, False], [False, False, True, True, True]])
    normalized = stats.normalize(z, covered)
    assert torch.all(normalized[~covered] == 0)
    expected = (z - stats.mean) / (stats.std + 1e-6) * 0.5
    torch.testing.assert_close(normalized[covered], expected[covered])
    restored = stats.denormalize(normalized, covered)
    torch.testing.assert_close(restored[covered], z[covered], rtol=1e-5, atol=1e-5)
    assert torch.all(restored[~covered] == 0)


def test_calibration_equals_stats_over_all_features_at_once(extractor, processed):
    cells = np.arange(N)
    expr = torch.tensor(ad.read_h5ad(processed).X.toarray())
    features = extractor.extract(expr)
    covered = extractor.covered_mask(expr)
    all_features = features[covered].double()
    small = calibrate(
        extractor, processed, cells, batch_size=3, max_cells=None, seed=0, genes=[f"g{j}" for j in range(G)]
    )
    large = calibrate(extractor, processed, cells, batch_size=16, max_cells=None, seed=0)
    torch.testing.assert_close(small.mean, all_features.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small.var, all_features.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small.mean, large.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small.var, large.var, rtol=1e-6, atol=1e-6)
    assert small.metadata["n_features"] == int(covered.sum())
    # after normalisation the covered features have mean 0 and std target_std per dimension
    normalized = small.normalize(features, covered)[covered]
    torch.testing.assert_close(normalized.mean(0), torch.zeros(32), rtol=0, atol=1e-4)
    torch.testing.assert_close(normalized.std(0, unbiased=False), torch.ones(32), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="gene list does not match"):
        calibrate(extractor, processed, cells, 8, None, 0, genes=[f"x{j}" for j in range(G)])


def test_saved_stats_load_weights_only_with_metadata(tmp_path, extractor, processed):
    stats = calibrate(extractor, processed, np.arange(10), batch_size=4, max_cells=None, seed=0, target_std=2.0)
    path = tmp_path / "fold1" / "latent_stats.pt"
    stats.save(path)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"mean", "var", "target_std", "metadata_json"}
    back = LatentStats.load(path)
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.var, stats.var) and back.target_std == 2.0
    assert back.metadata["model_id"] == extractor.model_id
    assert back.metadata["gene_vocab_ids"] == extractor.gene_vocab_ids.tolist()
    back.check_compatible(extractor.model_id, stats.metadata["genes_hash"])
    with pytest.raises(ValueError, match="rerun calibrate_latent"):
        back.check_compatible("whole-human", stats.metadata["genes_hash"])
    assert [p.name for p in path.parent.iterdir()] == ["latent_stats.pt"]  # no temporary file left behind


def test_training_cells_exclude_held_out_perturbations(tmp_path, processed):
    split = tmp_path / "fold1.json"
    split.write_text(
        json.dumps({"fold": 1, "seed": 42, "train": ["A", "B", "A+B"], "test": ["C+D"], "controls": "non-targeting"})
    )
    cells = training_cell_indices(processed, split)
    labels = np.array([LABELS[i % 5] for i in range(N)])
    assert set(labels[cells]) == {"non-targeting", "A", "B", "A+B"}
    assert len(cells) == 32 and "C+D" not in set(labels[cells])
    split.write_text(
        json.dumps({"fold": 1, "seed": 42, "train": ["A", "C+D"], "test": ["C+D"], "controls": "non-targeting"})
    )
    with pytest.raises(ValueError, match="both train and test"):
        training_cell_indices(processed, split)


def test_calibration_subsample_is_seeded():
    cells = np.arange(100, 200)
    first = choose_calibration_cells(cells, 10, seed=3)
    assert np.array_equal(first, choose_calibration_cells(cells, 10, seed=3))
    assert not np.array_equal(first, choose_calibration_cells(cells, 10, seed=4))
    assert set(first) <= set(cells) and np.all(np.diff(first) > 0)
    assert np.array_equal(choose_calibration_cells(cells, None, seed=0), cells)
