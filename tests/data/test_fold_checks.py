"""Fold checks of issue 13: a fold cell-eval cannot score, a batch size the cells cannot fill and
perturbations with 1-2 cells are reported at the split rule (before any training), and again
where the setting is used (score, train_ccfm) in case it changed after the split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.data.splits import FoldChecks, check_fold_usable, split_for_processed
from ccfm.data.validation import BatchSizeError, TooFewPerturbationsError, check_enough_perturbations
from ccfm.evaluate.celleval import ScoreOptions, score_prediction
from ccfm.model.training import TrainRequest, train_from_files
from training_data import MODEL, write_dataset


def _processed(path: Path, sizes: dict[str, int], n_genes: int = 8) -> Path:
    labels = [label for label, n in sizes.items() for _ in range(n)]
    x = np.log1p(np.random.default_rng(0).poisson(2.0, size=(len(labels), n_genes)).astype(np.float32))
    ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    ).write_h5ad(path)
    return path


SIZES = {"non-targeting": 60, "A": 30, "B": 30, "C": 30, "A+B": 20, "B+C": 20}


def test_fold_with_too_few_held_out_perturbations_falls_back_to_a_profile_that_scores_them(
    tmp_path: Path, caplog
) -> None:
    processed = _processed(tmp_path / "processed.h5ad", SIZES)
    split = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.3)
    assert len(split["test"]) == 1
    with caplog.at_level(logging.WARNING, logger="ccfm.data.splits"):
        entry = check_fold_usable(processed, split, FoldChecks(cell_eval_profile="full", batch_size=16))
    assert entry["configured"] == "full" and entry["used"] == "minimal"
    for fragment in (
        str(processed),
        "fold 1",
        "1 held-out perturbation",
        "'full' profile needs at least 3",
        "'minimal' profile instead",
        "split.heldout_fraction",
    ):
        assert fragment in entry["note"], f"{fragment!r} not in: {entry['note']}"
    assert entry["note"] in caplog.text  # said in the log, and in the split file the report shows
    kept = check_fold_usable(
        processed, split, FoldChecks(cell_eval_profile="vcc", batch_size=16)
    )  # vcc scores a single one
    assert kept == {"configured": "vcc", "used": "vcc", "note": ""}


def test_score_falls_back_when_the_profile_cannot_score_the_fold(tmp_path: Path, monkeypatch, caplog) -> None:
    import ccfm.evaluate.celleval as celleval

    real = _processed(tmp_path / "real.h5ad", {"non-targeting": 20, "A+B": 10, "B+C": 10})
    used: list[str] = []

    def fake_cell_eval(pred, real, control_label, profile, num_threads, pert_col):
        used.append(profile)
        table = pd.DataFrame({"statistic": ["mean"], "mse": [0.0]})
        return pd.DataFrame({"perturbation": ["A+B", "B+C"]}), table

    monkeypatch.setattr(celleval, "run_cell_eval", fake_cell_eval)
    with caplog.at_level(logging.WARNING, logger="ccfm.evaluate.celleval"):
        score_prediction(real, real, ScoreOptions(cell_eval_profile="full"))  # the real cells as their own prediction
    assert used == ["minimal"] and "real.h5ad: 2 held-out perturbation(s)" in caplog.text
    score_prediction(real, real, ScoreOptions(cell_eval_profile="vcc"))
    assert used == ["minimal", "vcc"]
    check_enough_perturbations(3, "full", "x")
    check_enough_perturbations(1, "de", "x")
    with pytest.raises(TooFewPerturbationsError):  # still the rule for a target context
        check_enough_perturbations(2, "full", "x", target=True)


def test_batch_size_beyond_every_training_perturbation_fails_at_the_split(tmp_path: Path) -> None:
    processed = _processed(tmp_path / "processed.h5ad", SIZES)
    split = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.3)
    with pytest.raises(BatchSizeError) as caught:
        check_fold_usable(processed, split, FoldChecks(cell_eval_profile="vcc", batch_size=4096))
    message = str(caught.value)
    for fragment in (
        "train.batch_size is 4096",
        "largest training perturbation has 30 cells",
        "60 control cells",
        "at most 30",
        str(processed),
    ):
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_batch_size_above_some_perturbations_is_logged(tmp_path: Path, caplog) -> None:
    processed = _processed(tmp_path / "processed.h5ad", SIZES)
    split = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="ccfm.data.splits"):
        check_fold_usable(processed, split, FoldChecks(cell_eval_profile="vcc", batch_size=25))
    assert "fewer cells than train.batch_size=25 and are drawn with replacement" in caplog.text


def test_train_from_files_refuses_an_oversized_batch_and_writes_nothing(tmp_path: Path) -> None:
    processed, split = write_dataset(tmp_path)  # 40 cells per perturbation, 120 controls
    out = tmp_path / "out"
    with pytest.raises(BatchSizeError, match="train.batch_size is 500"):
        train_from_files(
            TrainRequest(
                processed_h5ad=processed,
                split_json=split,
                out_model=out / "model.pt",
                out_loss=out / "loss.tsv",
                resume_dir=out / "resume",
                model_section=MODEL,
                train_section={"steps": 2, "batch_size": 500},
                latent_section={},
                seed=0,
                use_latent=False,
            ),
            device="cpu",
            progress=False,
        )
    assert not out.exists() or not any(out.rglob("*"))


def test_perturbations_with_one_or_two_cells_warn_and_a_minimum_leaves_them_out(tmp_path: Path, caplog) -> None:
    processed = _processed(tmp_path / "processed.h5ad", {**SIZES, "D": 2, "A+D": 1})
    with caplog.at_level(logging.WARNING, logger="ccfm.data.splits"):
        split = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.5)
    assert "2 perturbation(s) have only 1-2 cells" in caplog.text and "A+D (1), D (2)" in caplog.text
    assert "split.min_cells_per_perturbation" in caplog.text
    assert {"D", "A+D"} <= set(split["train"]) | set(split["test"]) and split["excluded_few_cells"] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ccfm.data.splits"):
        strict = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.5, min_cells_per_perturbation=3)
    assert strict["excluded_few_cells"] == ["A+D", "D"]
    assert not {"D", "A+D"} & (set(strict["train"]) | set(strict["test"]))
    assert "left out of training and scoring" in caplog.text and "have only 1-2 cells" not in caplog.text


def test_target_context_with_too_few_scored_perturbations_names_the_target_fix() -> None:
    with pytest.raises(TooFewPerturbationsError) as caught:
        check_enough_perturbations(2, "full", "results/x/target_processed.h5ad", target=True)
    message = str(caught.value)
    assert "target context has 2 perturbation(s) both predicted and observed" in message
    assert "'target:' block" in message and "split.heldout_fraction" not in message
