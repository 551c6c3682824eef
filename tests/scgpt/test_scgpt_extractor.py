"""Frozen scGPT feature extractor on the tiny checkpoint: shapes, zeros, equivariance, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor, quantile_bin, tie_break_draws
from scgpt_test_data import copy_checkpoint, random_vocab_ids

G = 120


@pytest.fixture(scope="module")
def tiny_dir(tiny_scgpt_checkpoint) -> Path:
    return tiny_scgpt_checkpoint(seed=11)


@pytest.fixture(scope="module")
def vocab_ids() -> np.ndarray:
    return random_vocab_ids(G, seed=0, unmapped=[3, 50, 77])  # genes outside the vocabulary


def _bare(**settings: object) -> ExtractorSettings:
    """A bare extractor's settings: every expressed mapped gene, no zero tokens, no cap."""
    return ExtractorSettings(max_tokens_per_cell=None, zero_tokens=False, **settings)


def _cells(n: int, seed: int) -> torch.Tensor:
    """log1p expression with varied sparsity (so cells have very different token counts)."""
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.6, size=(n, 1))
    counts = np.where(rng.random((n, G)) < density, rng.poisson(4.0, (n, G)), 0)
    return torch.tensor(np.log1p(counts), dtype=torch.float32)


def test_round_trip_shape_and_zeros_where_not_covered(tiny_dir, vocab_ids):
    extractor = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(seed=3))
    expr = _cells(5, 1)
    expr[:, 3] = 2.0  # expressed but unmapped
    features = extractor.extract(expr)
    assert features.shape == (5, G, 32) and features.dtype == torch.float32 and extractor.dim == 32
    covered = extractor.covered_mask(expr)
    assert torch.equal(covered, (expr > 0) & torch.from_numpy(vocab_ids >= 0))
    assert torch.all(features[~covered] == 0)
    assert torch.all(features[covered].abs().sum(-1) > 0)
    assert not features.requires_grad


def test_all_zero_cell_gets_all_zero_features(tiny_dir, vocab_ids):
    extractor = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(batching="padded"))
    expr = _cells(3, 2)
    expr[1] = 0
    features = extractor.extract(expr)
    assert torch.count_nonzero(features[1]) == 0
    assert torch.count_nonzero(features[0]) > 0


def test_permuting_gene_columns_permutes_the_output(tiny_dir, vocab_ids):
    perm = np.random.default_rng(5).permutation(G)
    expr = _cells(4, 3)
    base = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(seed=9)).extract(expr)
    permuted = ScGPTFeatureExtractor(tiny_dir, vocab_ids[perm], settings=_bare(seed=9)).extract(expr[:, perm])
    torch.testing.assert_close(permuted, base[:, perm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batching", ["padded", "sorted"])
def test_features_of_a_cell_do_not_depend_on_the_batch(tiny_dir, vocab_ids, batching):
    expr = _cells(9, 4)
    lengths = ((expr > 0) & torch.from_numpy(vocab_ids >= 0)).sum(1)
    assert lengths.max() > 2 * lengths.min()  # padding really happens
    alone = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(batching="single")).extract(expr)
    batched = ScGPTFeatureExtractor(
        tiny_dir,
        vocab_ids,
        settings=_bare(batching=batching, micro_batch_size=4),
    ).extract(expr)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    # the same cell in another batch composition
    mixed = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(batching=batching)).extract(
        torch.cat([_cells(5, 99), expr[2:3]])
    )
    torch.testing.assert_close(mixed[-1], alone[2], rtol=0, atol=1e-5)


def test_binning_ties_are_seeded_and_values_follow_args(tiny_dir, vocab_ids):
    extractor = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(seed=1))
    row = np.zeros(G, dtype=np.float32)
    row[vocab_ids >= 0] = np.log1p(np.arange(G)[vocab_ids >= 0] % 3 + 1)  # heavy ties: 3 distinct values
    cell = extractor.tokenize(row)
    assert cell.values.min() >= 1 and cell.values.max() <= 50
    assert np.array_equal(cell.values, extractor.tokenize(row).values)  # same seed, same bins
    other = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(seed=2)).tokenize(row)
    assert not np.array_equal(cell.values, other.values)  # ties broken by the seed
    # bins are monotone in expression: a higher value never gets a lower bin
    x = row[cell.positions]
    lower = x[:, None] < x[None, :]
    assert lower.any()
    assert np.all((cell.values[:, None] <= cell.values[None, :])[lower])


def test_quantile_bins_without_ties_are_ranks_scaled_to_the_bins():
    values = np.arange(1, 50, dtype=np.float32)  # 49 distinct values, 49 quantile edges + 1 top
    bins = quantile_bin(values, 51, tie_break_draws(0, np.arange(49), values))
    assert bins.min() == 1 and bins.max() == 50
    assert np.all(np.diff(bins) >= 0)


def test_continuous_input_style_passes_expression_through(tmp_path, tiny_dir, vocab_ids):
    copy_checkpoint(tiny_dir, tmp_path)
    args = json.loads((tmp_path / "args.json").read_text())
    args["input_style"] = "log1p"
    (tmp_path / "args.json").write_text(json.dumps(args))
    extractor = ScGPTFeatureExtractor(tmp_path, vocab_ids, settings=_bare())
    row = _cells(1, 6)[0].numpy()
    cell = extractor.tokenize(row)
    assert np.array_equal(cell.values, row[cell.positions])


def test_token_cap_keeps_the_highest_expressed_genes(tiny_dir, vocab_ids, caplog):
    expr = _cells(3, 7)
    extractor = ScGPTFeatureExtractor(
        tiny_dir, vocab_ids, settings=ExtractorSettings(max_tokens_per_cell=6, zero_tokens=False)
    )
    with caplog.at_level("WARNING"):
        features = extractor.extract(expr)
    assert "truncated" in caplog.text
    covered = extractor.covered_mask(expr)
    assert torch.equal(features.abs().sum(-1) > 0, covered)
    assert covered.sum(1).tolist() == [6, 6, 6]
    for i in range(3):
        kept_min = expr[i][covered[i]].min()
        dropped = expr[i][(expr[i] > 0) & ~covered[i] & torch.from_numpy(vocab_ids >= 0)]
        assert torch.all(dropped <= kept_min)


def test_bad_inputs_are_clear_errors(tiny_dir, vocab_ids):
    extractor = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare())
    with pytest.raises(ValueError, match=f"\\(B, {G}\\)"):
        extractor.extract(torch.zeros(2, G + 1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ScGPTFeatureExtractor(tiny_dir, np.array([0, 70000]), settings=_bare())


def test_zero_tokens_give_every_mapped_gene_a_contextual_feature(tiny_dir, vocab_ids):
    """Stage 2 cannot read "unexpressed" from exact zeros: unexpressed mapped genes get features too."""
    plain = ScGPTFeatureExtractor(tiny_dir, vocab_ids, settings=_bare(seed=3))
    dense = ScGPTFeatureExtractor(
        tiny_dir, vocab_ids, settings=ExtractorSettings(seed=3, zero_tokens=True, max_tokens_per_cell=None)
    )
    expr = _cells(4, 2)
    mapped = torch.from_numpy(vocab_ids >= 0)
    features = dense.extract(expr)
    assert torch.equal(dense.covered_mask(expr), mapped.expand(4, -1))
    unexpressed = (expr == 0) & mapped
    assert unexpressed.sum() > 50
    assert torch.all(features[unexpressed].abs().sum(-1) > 0)  # no exact-zero shortcut
    assert torch.all(features[:, ~mapped] == 0)  # genes outside the vocabulary still have nothing
    assert torch.all(plain.extract(expr)[unexpressed] == 0)
    # A zero token is context-dependent: the same unexpressed gene differs between cells.
    gene = int(np.flatnonzero(unexpressed.all(dim=0).numpy())[0]) if unexpressed.all(dim=0).any() else None
    if gene is not None:
        assert not torch.allclose(features[0, gene], features[1, gene])
    # The cap keeps the expressed genes first.
    capped = ScGPTFeatureExtractor(
        tiny_dir, vocab_ids, settings=ExtractorSettings(seed=3, zero_tokens=True, max_tokens_per_cell=40)
    )
    mask = capped.covered_mask(expr)
    assert torch.all(mask.sum(dim=1) == 40)
    expressed = (expr > 0) & mapped
    assert torch.all(mask[expressed.sum(dim=1) >= 40] <= expressed[expressed.sum(dim=1) >= 40])


def test_settings_from_the_latent_section_take_the_schema_defaults():
    """One home for latent defaults: keys the section leaves out come from the schema (zero_tokens: true)."""
    from ccfm.config import section_defaults

    schema = section_defaults("latent")
    settings = ExtractorSettings.from_latent({}, seed=4)
    assert settings.zero_tokens is True and schema["zero_tokens"] is True
    assert (settings.max_tokens_per_cell, settings.batching, settings.seed) == (
        schema["max_tokens_per_cell"],
        schema["batching"],
        4,
    )
    assert ExtractorSettings(seed=4) == settings  # the dataclass defaults are the schema's too
    given = ExtractorSettings.from_latent({"zero_tokens": False, "max_tokens_per_cell": 7, "batching": "padded"}, 1)
    assert (given.zero_tokens, given.max_tokens_per_cell, given.batching) == (False, 7, "padded")
