"""Prediction reads only the control cells of processed.h5ad and predicts what the full data would."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ccfm import CONTROL_LABEL
from ccfm.data.perturbations import PerturbationVocab
from ccfm.io import h5ad as h5io
from ccfm.model.checkpoint import save_model
from ccfm.model.expression import load_expression
from ccfm.model.generation import (
    GenerateSettings,
    predict_label,
    predict_to_files,
    prepare_generation,
    read_control_cells,
)
from ccfm.model.training import ResumePoint, Trainer, TrainingSet, TrainSettings, build_denoiser
from training_data import MODEL, write_dataset

SETTINGS = GenerateSettings(cells_per_perturbation=7, method="euler", latent_steps=2, expr_steps=2, batch_size=4)


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Path, Path, Path]:
    processed, split = write_dataset(tmp_path)
    data = load_expression(processed)
    labels = json.loads(split.read_text())["train"]
    vocab = PerturbationVocab.for_genes(data.genes)
    train = {"steps": 5, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "infer_top_gene": 12, "checkpoint_every": 5}
    denoiser = build_denoiser(data.n_genes, MODEL, train, 0, vocab, seed=1)
    trainer = Trainer(
        denoiser,
        TrainingSet(data, labels, vocab),
        TrainSettings.from_train_section(train),
        ResumePoint(tmp_path / "resume"),
        seed=1,
    )
    trainer.run(progress=False)
    model_pt = tmp_path / "model.pt"
    save_model(model_pt, trainer.denoiser, vocab)
    return model_pt, processed, split


def test_read_control_cells_returns_the_control_rows_in_file_order(tmp_path: Path) -> None:
    processed, _ = write_dataset(tmp_path)
    full = load_expression(processed)
    controls = read_control_cells(processed)
    rows = full.rows_of(CONTROL_LABEL)
    assert controls.genes == full.genes and controls.matrix.shape == (rows.size, full.n_genes) == (120, 20)
    assert set(controls.labels) == {CONTROL_LABEL}
    np.testing.assert_array_equal(controls.matrix.toarray(), full.matrix[rows].toarray())


def test_prediction_reads_only_controls_and_matches_the_full_data(trained, tmp_path, monkeypatch) -> None:
    model_pt, processed, split = trained
    control_rows = load_expression(processed).rows_of(CONTROL_LABEL)
    requested: list[np.ndarray] = []
    read_rows = h5io.read_csr_rows

    def spy(path, rows, *args, **kwargs):
        requested.append(np.asarray(rows))
        return read_rows(path, rows, *args, **kwargs)

    monkeypatch.setattr(h5io, "read_csr_rows", spy)
    generation = prepare_generation(model_pt, SETTINGS, device="cpu")
    out = tmp_path / "pred.h5ad"
    predict_to_files(generation, processed, split, ["G1+G3"], out, tmp_path / "pred_means.csv", seed=3)
    monkeypatch.undo()
    assert len(requested) == 1 and np.array_equal(requested[0], control_rows)

    # The same cells as generation from the whole matrix with the controls' row numbers in the file.
    full = load_expression(processed)
    pred = ad.read_h5ad(out)
    labels = pred.obs["target_gene"].astype(str).to_numpy()
    for label in ("G2+G3", "G1+G3"):
        expected = predict_label(generation.model, full, control_rows, label, SETTINGS, 3, generation.device)
        np.testing.assert_array_equal(pred.X[labels == label].toarray(), expected)
    np.testing.assert_array_equal(pred.X[labels == CONTROL_LABEL].toarray(), full.matrix[control_rows].toarray())
