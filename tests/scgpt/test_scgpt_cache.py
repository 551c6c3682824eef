"""Feature cache: same features as on the fly, reuse when valid, rebuild when stale, auto mode."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from ccfm.scgpt import feature_cache
from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
from ccfm.scgpt.feature_cache import (
    CACHE_FILES,
    MANIFEST,
    CachedSource,
    OnTheFlySource,
    build_feature_cache,
    count_tokens,
    make_latent_source,
)
from scgpt_test_data import random_vocab_ids, write_log1p_h5ad

G, N = 50, 30


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    rng = np.random.default_rng(8)
    counts = np.where(rng.random((N, G)) < 0.35, rng.poisson(3.0, (N, G)), 0)
    counts[4] = 0  # an empty cell
    return write_log1p_h5ad(tmp_path_factory.mktemp("data") / "processed.h5ad", counts, ["A"] * N)


@pytest.fixture(scope="module")
def extractor(tiny_scgpt_checkpoint) -> ScGPTFeatureExtractor:
    return ScGPTFeatureExtractor(
        tiny_scgpt_checkpoint(seed=2),
        random_vocab_ids(G, seed=3, unmapped=[0, 7]),
        settings=ExtractorSettings(seed=1, max_tokens_per_cell=None, zero_tokens=False),
    )


@pytest.fixture(scope="module")
def expression(processed) -> torch.Tensor:
    return torch.tensor(ad.read_h5ad(processed).X.toarray())


def test_cached_features_equal_on_the_fly_features(tmp_path, extractor, processed, expression):
    train = np.arange(0, N, 2)
    source = make_latent_source("on", extractor, processed, train, tmp_path / "cache", max_gb=1.0)
    assert isinstance(source, CachedSource)
    batch = np.array([10, 4, 0, 22])
    cached = source.features(batch, expression[batch])
    fresh = OnTheFlySource(extractor).features(batch, expression[batch])
    assert cached.shape == (4, G, 32)
    assert torch.equal(cached == 0, fresh == 0)  # same covered positions, exact zeros elsewhere
    torch.testing.assert_close(cached, fresh, rtol=2e-3, atol=2e-3)  # fp16 storage
    assert torch.equal(source.covered_mask(batch, expression[batch]), extractor.covered_mask(expression[batch]))
    # a cell outside the cached list (odd index) is computed on the fly, not refused
    outside = source.features(np.array([3]), expression[[3]])
    torch.testing.assert_close(outside, extractor.extract(expression[[3]]), rtol=0, atol=0)
    assert source.n_fallback == 1
    stored = np.load(tmp_path / "cache" / "features.npy", mmap_mode="r")
    assert stored.dtype == np.float16
    assert stored.shape[0] == int(count_tokens(extractor, processed, train).sum())


def test_valid_cache_is_reused_and_a_stale_one_rebuilt(tmp_path, extractor, processed):
    cache = tmp_path / "cache"
    make_latent_source("on", extractor, processed, np.arange(10), cache, max_gb=1.0)
    first = json.loads((cache / "manifest.json").read_text())
    stamp = (cache / "features.npy").stat().st_mtime_ns
    make_latent_source("auto", extractor, processed, np.arange(10), cache, max_gb=1.0)
    assert (cache / "features.npy").stat().st_mtime_ns == stamp  # reused, not recomputed
    make_latent_source("on", extractor, processed, np.arange(12), cache, max_gb=1.0)
    second = json.loads((cache / "manifest.json").read_text())
    assert second["cells_hash"] != first["cells_hash"] and second["n_cells"] == 12
    assert np.load(cache / "cells.npy").tolist() == list(range(12))
    (cache / "manifest.json").unlink()  # an interrupted build leaves no manifest -> rebuilt
    assert isinstance(make_latent_source("on", extractor, processed, np.arange(12), cache, 1.0), CachedSource)
    assert not list(cache.glob(".*building*"))


def test_auto_mode_decides_from_the_estimated_size(tmp_path, extractor, processed, caplog):
    with caplog.at_level(logging.INFO):
        small = make_latent_source("auto", extractor, processed, np.arange(N), tmp_path / "a", max_gb=1.0)
        big = make_latent_source("auto", extractor, processed, np.arange(N), tmp_path / "b", max_gb=1e-9)
    assert isinstance(small, CachedSource) and isinstance(big, OnTheFlySource)
    assert "estimated" in caplog.text and "GB" in caplog.text
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert isinstance(
        make_latent_source("off", extractor, processed, np.arange(N), tmp_path / "c", 1.0), OnTheFlySource
    )
    with pytest.raises(ValueError, match="auto, on or off"):
        make_latent_source("yes", extractor, processed, np.arange(N), tmp_path / "d", 1.0)


def test_cache_files_are_group_readable_and_a_failed_manifest_write_leaves_none(
    tmp_path, extractor, processed, umask_022, monkeypatch
):
    cache = tmp_path / "cache"
    build_feature_cache(extractor, processed, np.arange(6), cache)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in cache.iterdir()}
    assert modes == {name: 0o644 for name in (*CACHE_FILES, MANIFEST)}
    # A manifest value JSON cannot encode: the dump fails after writing the first entries.
    monkeypatch.setattr(feature_cache, "cache_manifest", lambda *args: {"format_version": 1, "model": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        build_feature_cache(extractor, processed, np.arange(6), cache)
    assert sorted(path.name for path in cache.iterdir()) == sorted(CACHE_FILES)  # no manifest: the cache is invalid
