"""Frozen scGPT feature extraction on a CUDA device: same features as on the CPU, bf16, the feature cache.

Marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
from ccfm.scgpt.feature_cache import CachedSource, make_latent_source
from scgpt_test_data import random_vocab_ids, write_log1p_h5ad

pytestmark = pytest.mark.gpu

G = 90
SIZES = {"embsize": 64, "nlayers": 2, "nheads": 4, "d_hid": 64}


def _counts(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.1, 0.7, size=(n, 1))
    return np.where(rng.random((n, G)) < density, rng.poisson(4.0, (n, G)), 0).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tiny_scgpt_checkpoint):
    return tiny_scgpt_checkpoint(seed=21, **SIZES)


@pytest.mark.parametrize("zero_tokens", [False, True])
def test_cuda_features_match_the_cpu(checkpoint, zero_tokens) -> None:
    ids = random_vocab_ids(G, seed=2, unmapped=[5, 40])
    expr = np.log1p(_counts(40, 3))
    cpu = ScGPTFeatureExtractor(
        checkpoint, ids, "cpu", settings=ExtractorSettings(max_tokens_per_cell=64, seed=1, zero_tokens=zero_tokens)
    )
    cuda = ScGPTFeatureExtractor(
        checkpoint,
        ids,
        "cuda",
        settings=ExtractorSettings(max_tokens_per_cell=64, seed=1, zero_tokens=zero_tokens, micro_batch_size=8),
    )
    assert cpu.batching == "single" and cuda.batching == "sorted"  # the per-device defaults
    on_cuda = cuda.extract(expr)
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda.cpu(), cpu.extract(expr), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda.covered_mask(torch.from_numpy(expr)), cpu.covered_mask(expr))


def test_bf16_autocast_features_stay_close(checkpoint) -> None:
    ids = random_vocab_ids(G, seed=4)
    expr = np.log1p(_counts(24, 5))
    fp32 = ScGPTFeatureExtractor(
        checkpoint, ids, "cuda", settings=ExtractorSettings(max_tokens_per_cell=None, seed=1, zero_tokens=False)
    ).extract(expr)
    bf16 = ScGPTFeatureExtractor(
        checkpoint,
        ids,
        "cuda",
        settings=ExtractorSettings(max_tokens_per_cell=None, seed=1, autocast_bf16=True, zero_tokens=False),
    ).extract(expr)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    relative = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < relative.item() < 0.05  # bf16 was used (not bit-identical) and stays close


def test_feature_cache_built_on_cuda_reads_back_what_was_extracted(checkpoint, tmp_path) -> None:
    ids = random_vocab_ids(G, seed=6, unmapped=[1])
    counts = _counts(30, 7)
    processed = write_log1p_h5ad(tmp_path / "processed.h5ad", counts, ["non-targeting"] * 30)
    extractor = ScGPTFeatureExtractor(
        checkpoint, ids, "cuda", settings=ExtractorSettings(max_tokens_per_cell=64, seed=1, zero_tokens=True)
    )
    rows = np.arange(0, 30, 2)
    source = make_latent_source("on", extractor, processed, rows, tmp_path / "cache", max_gb=1.0)
    assert isinstance(source, CachedSource)
    expr = torch.from_numpy(np.log1p(counts[rows])).to("cuda")
    cached = source.features(rows, expr)
    assert cached.device.type == "cuda" and source.n_fallback == 0
    # features are stored as float16
    torch.testing.assert_close(cached, extractor.extract(expr), rtol=2e-3, atol=2e-3)
