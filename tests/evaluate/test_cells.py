"""Cell-level metrics against closed-form cases: identical sets, shifted sets, a point mass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccfm.evaluate.cells import (
    cell_metrics,
    correlation_error,
    energy_distance,
    rbf_mmd,
    split_halves,
    std_ratio,
)


def test_energy_distance_closed_forms():
    x = np.array([[0.0], [2.0]])
    # identical sets: exactly 0 (V-statistic, diagonal included)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    # two point masses at distance d: 2d - 0 - 0
    assert energy_distance(np.zeros((3, 2)), np.full((4, 2), [3.0, 4.0])) == pytest.approx(10.0)
    # x = {0, 2}, y = {1, 3} in 1-D: between (1 + 3 + 1 + 1)/4 = 1.5, within (0 + 2 + 2 + 0)/4 = 1
    assert energy_distance(x, x + 1.0) == pytest.approx(2 * 1.5 - 1 - 1)
    # unlike the squared-distance version, a point mass at the right mean is not free
    spread = np.array([[-1.0], [1.0]])
    assert energy_distance(np.zeros((2, 1)), spread) == pytest.approx(2 * 1.0 - 0.0 - 1.0)


def test_energy_distance_sees_spread_not_only_means():
    rng = np.random.default_rng(0)
    real = rng.normal(0.0, 1.0, size=(400, 5))
    same = rng.normal(0.0, 1.0, size=(400, 5))
    collapsed = np.zeros((400, 5))
    assert energy_distance(same, real) < 0.1
    assert energy_distance(collapsed, real) > 1.0


def test_std_ratio_closed_forms():
    real = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # second gene constant: not variable
    assert std_ratio(real, real) == pytest.approx(1.0)
    assert std_ratio(np.full((3, 2), 2.0), real) == 0.0  # a point mass
    assert std_ratio(real * 0.5, real) == pytest.approx(0.5)


def test_correlation_error_closed_forms():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 1))
    correlated = np.hstack([base, base + 0.01 * rng.normal(size=(200, 1))])
    independent = rng.normal(size=(200, 2))
    assert correlation_error(correlated, correlated) == pytest.approx(0.0)
    # corr ~1 against ~0: the one off-diagonal pair differs by about 1
    assert correlation_error(independent, correlated) == pytest.approx(1.0, abs=0.15)
    # a constant gene correlates 0 with everything (not NaN)
    assert correlation_error(np.ones((5, 2)), np.ones((5, 2))) == 0.0


def test_rbf_mmd_identical_near_zero_shifted_positive():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 3))
    y = rng.normal(size=(100, 3))
    assert abs(rbf_mmd(x, y)) < 0.05
    assert rbf_mmd(x + 3.0, y) > 0.5
    assert math.isnan(rbf_mmd(x[:1], y))


def test_split_halves_partition_the_cells():
    halves = split_halves(11, np.random.default_rng(0))
    assert len(halves.first) == 5 and len(halves.second) == 6
    assert sorted(np.concatenate([halves.first, halves.second]).tolist()) == list(range(11))


def test_cell_metrics_real_cells_score_their_floor_and_collapse_does_not():
    rng = np.random.default_rng(3)
    real = rng.normal(2.0, 0.5, size=(300, 6))
    same = rng.normal(2.0, 0.5, size=(300, 6))
    collapsed = np.tile(real.mean(axis=0), (300, 1))
    identity = lambda cells: cells  # noqa: E731 - the PCA space is the gene space here
    de = np.arange(4)
    good = cell_metrics(same, real, identity, de, np.random.default_rng(0))
    bad = cell_metrics(collapsed, real, identity, de, np.random.default_rng(0))
    assert good["energy_distance"] < 1.5 * good["energy_distance_floor"] + 0.02
    assert bad["energy_distance"] > 5 * bad["energy_distance_floor"]
    assert good["std_ratio"] == pytest.approx(1.0, abs=0.1)
    assert bad["std_ratio"] == pytest.approx(0.0, abs=1e-9)
    # the floor is the same draw for both (same seed): it does not depend on the method
    assert good["energy_distance_floor"] == bad["energy_distance_floor"]
