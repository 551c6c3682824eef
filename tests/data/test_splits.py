"""Condition splits and the per-fold real.h5ad (ccfm.data.splits)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ccfm.data.conditions import CONTROL
from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset
from ccfm.data.simulate import simulate_demo
from ccfm.data.splits import make_split, split_for_processed, write_real
from ccfm.io.splits import SplitLeakError, read_split, write_split

SINGLES = [f"G{i:02d}" for i in range(12)]
DOUBLES = [f"{a}+{b}" for i, a in enumerate(SINGLES) for b in SINGLES[i + 1 :]][:30]


def test_additive_split_has_no_leak_and_trains_every_single() -> None:
    labels = [CONTROL] * 3 + SINGLES + DOUBLES + DOUBLES  # duplicates as in a cell-level column
    for fold in (1, 2, 3):
        split = make_split(labels, fold=fold, seed=42, heldout_fraction=0.3, n_folds=5)
        train, test = set(split["train"]), set(split["test"])
        assert split["strategy"] == "additive" and split["seed"] == 42 + fold
        assert not train & test
        assert set(SINGLES) <= train
        assert test <= set(DOUBLES) and len(test) == 9  # round(0.3 * 30)
        assert train | test == set(SINGLES) | set(DOUBLES)
        assert CONTROL not in train | test and split["controls"] == CONTROL


SPLIT_KEYS = [
    "fold",
    "seed",
    "strategy",
    "heldout_fraction",
    "train",
    "test",
    "controls",
    "doubles_missing_singles",
    "kept_in_train_unmeasured",
]


def test_predict_only_split_trains_every_condition_in_the_split_file_layout() -> None:
    labels = [CONTROL] * 2 + SINGLES[:3] + ["G00+G01", "G02+G05"]
    split = make_split(labels, fold=2, seed=7, heldout_fraction=0)
    assert list(split) == SPLIT_KEYS  # the JSON file's key order
    assert split["strategy"] == "predict_only" and split["seed"] == 9 and split["heldout_fraction"] == 0.0
    assert split["train"] == sorted(set(labels) - {CONTROL}) and split["test"] == []
    assert split["doubles_missing_singles"] == ["G02+G05"] and split["kept_in_train_unmeasured"] == []
    assert list(make_split(labels, fold=2, seed=7, heldout_fraction=0.5)) == SPLIT_KEYS
    with pytest.raises(ValueError, match="only controls"):
        make_split([CONTROL] * 3, fold=1, seed=0, heldout_fraction=0)


def test_split_is_seeded_and_folds_differ() -> None:
    labels = SINGLES + DOUBLES
    first = make_split(labels, fold=1, seed=42, heldout_fraction=0.3)
    again = make_split(list(reversed(labels)), fold=1, seed=42, heldout_fraction=0.3)
    other = make_split(labels, fold=2, seed=42, heldout_fraction=0.3)
    assert first == again  # independent of label order
    assert first["test"] != other["test"]


def test_singles_only_dataset_holds_out_singles() -> None:
    split = make_split([CONTROL] + SINGLES, fold=1, seed=0, heldout_fraction=0.25)
    assert split["strategy"] == "singles"
    assert len(split["test"]) == 3 and not set(split["test"]) & set(split["train"])
    assert set(split["train"]) | set(split["test"]) == set(SINGLES)


def test_doubles_without_singles_are_warned(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ccfm.data.splits"):
        split = make_split(["A", "B", "A+B", "A+C"], fold=1, seed=0, heldout_fraction=0.5)
    assert split["doubles_missing_singles"] == ["A+C"]
    assert "A+C" in caplog.text


def test_invalid_arguments_and_leak_detection(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fold must be in 1..5"):
        make_split(SINGLES, fold=6, seed=0, heldout_fraction=0.3, n_folds=5)
    with pytest.raises(ValueError, match="heldout_fraction"):
        make_split(SINGLES, fold=1, seed=0, heldout_fraction=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fold": 1, "seed": 1, "train": ["A+B"], "test": ["A+B"], "controls": CONTROL}))
    with pytest.raises(SplitLeakError, match="A\\+B"):
        read_split(bad)


def test_split_and_real_on_simulated_demo(tmp_path: Path) -> None:
    paths = simulate_demo(
        tmp_path / "raw",
        seed=5,
        n_genes=80,
        n_real_symbols=40,
        n_singles=6,
        n_doubles=10,
        n_control_cells=150,
        cells_per_condition=20,
        n_target_control_cells=20,
        n_target_singles=1,
        n_target_doubles=1,
        target_cells_per_condition=5,
    )
    processed = tmp_path / "processed.h5ad"
    preprocess_dataset(paths["raw"], processed, PreprocessSettings(dataset="demo", n_top_genes=30, chunk_size=100))
    split = split_for_processed(processed, fold=1, seed=42, heldout_fraction=0.3, n_folds=2)
    write_split(split, tmp_path / "splits" / "fold1.json")
    loaded = read_split(tmp_path / "splits" / "fold1.json")
    assert loaded["test"] == split["test"] and len(loaded["test"]) == 3
    assert loaded["n_cells"] == {"train": (6 + 10 - 3) * 20, "test": 3 * 20, "controls": 150}

    real_path = tmp_path / "fold1" / "real.h5ad"
    n_written = write_real(processed, split, real_path, chunk_size=64)
    real = ad.read_h5ad(real_path)
    full = ad.read_h5ad(processed)
    assert n_written == real.n_obs == 150 + 3 * 20
    assert set(real.obs["target_gene"]) == set(split["test"]) | {CONTROL}
    assert not set(real.obs["target_gene"]) & set(split["train"])
    assert list(real.var_names) == list(full.var_names)
    expected = full[full.obs["target_gene"].isin(set(split["test"]) | {CONTROL})]
    assert list(real.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(real.X.toarray(), expected.X.toarray())


def test_heldout_fraction_zero_trains_on_everything_and_holds_out_nothing() -> None:
    labels = [CONTROL] * 3 + SINGLES + DOUBLES
    split = make_split(labels, fold=1, seed=42, heldout_fraction=0.0)
    assert split["strategy"] == "predict_only" and split["test"] == []
    assert split["train"] == sorted(SINGLES + DOUBLES)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_split(labels, fold=1, seed=42, heldout_fraction=-0.1)


def test_only_eligible_doubles_are_held_out_and_none_eligible_names_predict_only() -> None:
    # U1..U3 have no column; U3 has no single, so a double with U3 must train
    labels = [CONTROL, "A", "B", "U1", "U2", "A+U1", "B+U2", "A+U3", "B+U3", "U1+U2"]
    for fold in range(1, 6):
        split = make_split(labels, fold=fold, seed=0, heldout_fraction=0.9, measured_genes=["A", "B"])
        assert set(split["test"]) <= {"A+U1", "B+U2", "U1+U2"}
        assert split["kept_in_train_unmeasured"] == ["A+U3", "B+U3"]
    with pytest.raises(ValueError, match="heldout_fraction: 0"):
        make_split([CONTROL, "A", "A+U3", "B+U4"], fold=1, seed=0, heldout_fraction=0.3, measured_genes=["A"])


def test_predict_only_needs_a_predict_list() -> None:
    from ccfm.config import ConfigError, validate_config

    config = {
        "seed": 1,
        "run": ["x"],
        "datasets": {"x": {"source": "path", "path": "x.h5ad", "split": {"heldout_fraction": 0}}},
    }
    with pytest.raises(ConfigError, match="predict:"):
        validate_config(config)
    config["datasets"]["x"]["predict"] = ["A+B"]
    validate_config(config)
