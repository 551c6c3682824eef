"""Training loop, checkpoint resume, model files and prediction on a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ccfm.data.conditions import conditions_to_predict
from ccfm.data.perturbations import PerturbationVocab
from ccfm.model.checkpoint import load_model, save_model
from ccfm.model.expression import load_expression
from ccfm.model.generation import GenerateSettings, predict_to_files, prepare_generation
from ccfm.model.training import (
    LOSS_COLUMNS,
    PerturbationBatchSampler,
    ResumePoint,
    Trainer,
    TrainingSet,
    TrainRequest,
    TrainSettings,
    build_denoiser,
    run_fingerprint,
    train_from_files,
    warmup_cosine,
    write_loss_tsv,
)
from scgpt_test_data import SMALL_SCGPT_SIZES
from training_data import MODEL, N_GENES, SINGLES, FakeLatent, tiny_scgpt_inputs, write_dataset


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    return write_dataset(tmp_path)


def _trainer(processed: Path, split: Path, resume: Path, steps: int, latent_dim: int = 0, **train) -> Trainer:
    data = load_expression(processed)
    labels = json.loads(split.read_text())["train"]
    vocab = PerturbationVocab.for_genes(data.genes)
    train_section = {
        "steps": steps,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 5,
        "infer_top_gene": 12,
        "checkpoint_every": 10,
        "log_every": 5,
        "mmd": True,
        "gamma": 0.5,
        **train,
    }
    settings = TrainSettings.from_train_section(train_section)
    den = build_denoiser(data.n_genes, MODEL, train_section, latent_dim, vocab, seed=7)
    return Trainer(
        den,
        TrainingSet(data, labels, vocab, latent_targets=FakeLatent(latent_dim) if latent_dim else None),
        settings,
        ResumePoint(resume, fingerprint=run_fingerprint(settings, den, vocab, labels, 7)),
        seed=7,
    )


def _request(processed: Path, split: Path, out: Path, train: dict) -> TrainRequest:
    """A no-latent training request writing into ``out`` (model, loss log, resume folder)."""
    return TrainRequest(
        processed_h5ad=processed,
        split_json=split,
        out_model=out / "model.pt",
        out_loss=out / "loss.tsv",
        resume_dir=out / "resume",
        model_section=MODEL,
        train_section=train,
        latent_section={},
        seed=3,
        use_latent=False,
    )


def test_load_expression_keeps_csr(dataset) -> None:
    data = load_expression(dataset[0])
    assert sp.issparse(data.matrix) and data.matrix.dtype == np.float32
    assert data.genes[:2] == ["G0", "G1"] and data.rows_of("non-targeting").size == 120


def test_sampler_draws_one_perturbation_against_controls(dataset) -> None:
    data = load_expression(dataset[0])
    sampler = PerturbationBatchSampler(data, SINGLES, batch_size=8, window=12, rng=np.random.default_rng(0))
    batch = sampler.sample()
    assert batch.label in SINGLES
    assert set(data.labels[batch.target_rows]) == {batch.label}
    assert set(data.labels[batch.control_rows]) == {"non-targeting"}
    assert batch.gene_window.size == 12 and np.all(np.diff(batch.gene_window) > 0)
    # a window larger than the gene count is all genes
    assert (
        PerturbationBatchSampler(data, SINGLES, 8, 500, np.random.default_rng(0)).sample().gene_window.size == N_GENES
    )


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


# (flow settings, least drop of the expression loss over 100 steps). With the start cell as the
# network's input the endpoint of each path is predictable and the loss falls towards 0 (that is
# the collapse: tests/model/test_flow_spread.py); with the default flow (another control cell,
# OT pairs) the within-condition spread is irreducible and only the perturbation's shift is
# learnable here (no mean model): about 0.12 of ~0.4 on this data.
FLOWS = {
    "start cell, independent pairs": ({"condition_cell": "start", "coupling": "independent"}, 0.75),
    "default": ({}, 0.92),
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
@pytest.mark.parametrize("latent_dim", [0, 4])
def test_loss_goes_down(dataset, tmp_path, latent_dim, flow) -> None:
    settings, least_drop = FLOWS[flow]
    trainer = _trainer(*dataset, tmp_path / "resume", steps=100, latent_dim=latent_dim, **settings)
    history = np.asarray(trainer.run(progress=False).history)
    assert history.shape == (20, len(LOSS_COLUMNS))
    first, last = history[:2, 2].mean(), history[-4:, 2].mean()  # expression loss
    assert last < least_drop * first, (first, last)
    if latent_dim:
        assert history[-4:, 3].mean() < 0.75 * history[:2, 3].mean()
    else:
        assert np.all(history[:, 3] == 0)


@pytest.mark.parametrize("latent_dim", [0, 4])
def test_resume_matches_uninterrupted_run(dataset, tmp_path, latent_dim) -> None:
    full = _trainer(*dataset, tmp_path / "a", steps=30, latent_dim=latent_dim)
    full_history = full.run(progress=False).history
    # "killed" after 20 steps (last checkpoint at 20), then a fresh process resumes to 30
    killed = _trainer(*dataset, tmp_path / "b", steps=30, latent_dim=latent_dim)
    killed.run(stop_at_step=23, progress=False)
    resumed = _trainer(*dataset, tmp_path / "b", steps=30, latent_dim=latent_dim)
    result = resumed.run(progress=False)
    assert result.resumed_from == 20 and result.steps_run == 10
    for (name, a), (_, b) in zip(full.denoiser.state_dict().items(), resumed.denoiser.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.history == full_history


def test_checkpoint_of_other_config_is_ignored(dataset, tmp_path) -> None:
    _trainer(*dataset, tmp_path / "r", steps=10).run(progress=False)
    other = _trainer(*dataset, tmp_path / "r", steps=10, lr=1e-4)
    assert other.try_resume() == 0


def test_model_file_roundtrip_and_prediction(dataset, tmp_path) -> None:
    processed, split = dataset
    trainer = _trainer(processed, split, tmp_path / "resume", steps=10, latent_dim=4)
    trainer.run(progress=False)
    model_pt = tmp_path / "model.pt"
    save_model(model_pt, trainer.denoiser, trainer.vocab, {"seed": 7})
    loaded = load_model(model_pt)
    for (name, a), (_, b) in zip(trainer.denoiser.state_dict().items(), loaded.denoiser.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.genes == trainer.data.genes and loaded.metadata == {"seed": 7}

    settings = GenerateSettings(cells_per_perturbation=6, latent_steps=2, expr_steps=2, batch_size=4, method="euler")
    generation = prepare_generation(model_pt, settings, device="cpu")
    out_h5ad, out_csv = tmp_path / "pred.h5ad", tmp_path / "pred_means.csv"
    timing = predict_to_files(generation, processed, split, ["G3+G1", "G1+G3"], out_h5ad, out_csv, seed=3)
    pred = ad.read_h5ad(out_h5ad)
    counts = pred.obs["target_gene"].astype(str).value_counts()
    assert counts["G2+G3"] == 6 and counts["G1+G3"] == 6 and counts["non-targeting"] == 120
    assert list(pred.var_names) == trainer.data.genes
    assert pred.X.min() >= 0 and timing["cells"] == 12
    means = pd.read_csv(out_csv, index_col=0)
    assert list(means.index) == ["G2+G3", "G1+G3"]
    # the same seed reproduces the file; adding a perturbation leaves the others unchanged
    predict_to_files(generation, processed, split, ["G1+G3"], tmp_path / "p2.h5ad", tmp_path / "m2.csv", seed=3)
    again = ad.read_h5ad(tmp_path / "p2.h5ad")
    np.testing.assert_array_equal(
        again[again.obs["target_gene"] == "G2+G3"].X.toarray(), pred[pred.obs["target_gene"] == "G2+G3"].X.toarray()
    )
    with pytest.raises(KeyError, match="not among"):
        predict_to_files(
            generation, processed, split, ["G1+NOTAGENE"], tmp_path / "p3.h5ad", tmp_path / "m3.csv", seed=3
        )


def test_prepare_generation_loads_the_model_with_the_rule_settings(dataset, tmp_path) -> None:
    trainer = _trainer(*dataset, tmp_path / "resume", steps=1)
    model_pt = tmp_path / "model.pt"
    save_model(model_pt, trainer.denoiser, trainer.vocab)
    threads_before = torch.get_num_threads()
    try:
        generation = prepare_generation(
            model_pt, {"cells_per_perturbation": 6, "method": "euler"}, threads=2, device="cpu"
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)
    # a partial config section: the rest are the sampler's defaults
    assert generation.settings == GenerateSettings(
        cells_per_perturbation=6, method="euler", latent_steps=20, expr_steps=20, batch_size=256
    )
    assert generation.device == torch.device("cpu") and generation.model_pt == model_pt
    assert generation.model.genes == trainer.data.genes
    assert all(p.device.type == "cpu" for p in generation.model.denoiser.parameters())


def test_conditions_to_predict_canonicalises() -> None:
    assert conditions_to_predict(["A+B"], ["B+A", "C", "D+C"]) == ["A+B", "C", "C+D"]


def test_loss_tsv(tmp_path) -> None:
    rows = [[5, 1.0, 0.8, 0.1, 0.2, 1e-3], [10, 0.5, 0.4, 0.05, 0.1, 9e-4]]
    write_loss_tsv(rows, tmp_path / "loss.tsv")
    frame = pd.read_csv(tmp_path / "loss.tsv", sep="\t")
    assert list(frame.columns) == list(LOSS_COLUMNS) and frame["step"].tolist() == [5, 10]


def test_train_from_files_with_tiny_scgpt(tmp_path, tiny_scgpt_checkpoint) -> None:
    """The real wiring: tiny scGPT checkpoint, gene vocab, calibrated stats, cache, model.pt."""
    inputs = tiny_scgpt_inputs(tmp_path, tiny_scgpt_checkpoint(seed=0, **SMALL_SCGPT_SIZES))
    train = {
        "steps": 12,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 2,
        "infer_top_gene": 10,
        "checkpoint_every": 5,
        "log_every": 4,
    }
    out = tmp_path / "ccfm"
    result = train_from_files(
        TrainRequest(
            processed_h5ad=inputs["processed_h5ad"],
            split_json=inputs["split_json"],
            out_model=out / "model.pt",
            out_loss=out / "loss.tsv",
            resume_dir=out / "resume",
            model_section=MODEL,
            train_section=train,
            latent_section={"cache": "on", "cache_max_gb": 1, "max_tokens_per_cell": 1200},
            seed=5,
            use_latent=True,
            scgpt_dir=inputs["scgpt_dir"],
            gene_vocab_tsv=inputs["gene_vocab_tsv"],
            latent_stats=inputs["latent_stats"],
        ),
        device="cpu",
        progress=False,
    )
    assert result.steps_run == 12 and result.extract_seconds > 0
    loaded = load_model(out / "model.pt")
    assert loaded.denoiser.model.config.latent_dim == 16 and loaded.genes == inputs["genes"]
    assert (out / "resume" / "feature_cache" / "manifest.json").exists()
    frame = pd.read_csv(out / "loss.tsv", sep="\t")
    assert frame["step"].tolist() == [4, 8, 12] and (frame["latent"] > 0).any()


def test_train_from_files_samples_only_training_and_control_cells(dataset, tmp_path, monkeypatch) -> None:
    """Through the rule's entry point: every row the trainer samples or reads is a training or control cell."""
    from ccfm.model import expression, training

    processed, split = dataset
    split_data = json.loads(split.read_text())
    labels = ad.read_h5ad(processed).obs["target_gene"].astype(str).to_numpy()  # the file, read independently
    allowed = set(np.flatnonzero(np.isin(labels, [*split_data["train"], split_data["controls"]])).tolist())
    held_out = set(np.flatnonzero(np.isin(labels, split_data["test"])).tolist())
    assert len(allowed) == 320 and len(held_out) == 40

    sampled: list[training.Batch] = []
    read: list[np.ndarray] = []
    real_sample, real_dense_rows = training.PerturbationBatchSampler.sample, expression.ExpressionData.dense_rows

    def spy_sample(self):
        batch = real_sample(self)
        sampled.append(batch)
        return batch

    def spy_dense_rows(self, rows):
        read.append(np.asarray(rows).copy())
        return real_dense_rows(self, rows)

    monkeypatch.setattr(training.PerturbationBatchSampler, "sample", spy_sample)
    monkeypatch.setattr(expression.ExpressionData, "dense_rows", spy_dense_rows)
    train = {"steps": 30, "batch_size": 8, "warmup_steps": 2, "log_every": 10, "checkpoint_every": 100}
    out = tmp_path / "run"
    result = train_from_files(
        _request(processed, split, out, train),
        device="cpu",
        progress=False,
    )
    assert result.steps_run == 30 and len(sampled) == 30
    assert {batch.label for batch in sampled} <= set(split_data["train"])
    assert len({batch.label for batch in sampled}) >= 3  # the spy saw real sampling
    target_rows = set(np.concatenate([batch.target_rows for batch in sampled]).tolist())
    control_rows = set(np.concatenate([batch.control_rows for batch in sampled]).tolist())
    assert target_rows <= allowed and not target_rows & held_out
    assert {labels[row] for row in control_rows} == {split_data["controls"]}
    every_read = set(np.concatenate(read).tolist())
    assert every_read <= allowed and not every_read & held_out, sorted(every_read & held_out)[:5]


def test_training_reads_only_training_and_control_cells(dataset) -> None:
    processed, split = dataset
    full = load_expression(processed)
    kept = load_expression(processed, keep_labels=["G0", "non-targeting"])
    assert kept.matrix.shape == (160, N_GENES) and full.matrix.shape == (360, N_GENES)
    # rows keep their file numbering: the same cells give the same values
    rows = kept.rows_of("G0")
    np.testing.assert_array_equal(rows, full.rows_of("G0"))
    np.testing.assert_array_equal(kept.dense_rows(rows[[3, 0, 7]]), full.dense_rows(rows[[3, 0, 7]]))
    assert kept.rows_of("G1").size == 0
    with pytest.raises(IndexError, match="not loaded"):
        kept.dense_rows(full.rows_of("G1")[:2])


def test_latent_targets_take_zero_tokens_from_the_schema(tmp_path, tiny_scgpt_checkpoint) -> None:
    """A latent section without ``zero_tokens`` runs with the schema's default (true), as calibration does."""
    from ccfm.config import section_defaults
    from ccfm.model.latent_targets import scgpt_targets
    from ccfm.scgpt.calibration import LatentStats

    inputs = tiny_scgpt_inputs(tmp_path, tiny_scgpt_checkpoint(seed=0, **SMALL_SCGPT_SIZES))
    assert section_defaults("latent")["zero_tokens"] is True
    calibrated = LatentStats.load(inputs["latent_stats"])
    assert calibrated.metadata["zero_tokens"] is True  # calibrated with the schema's settings
    without = tmp_path / "latent_stats_without_zero_tokens.pt"
    LatentStats(
        calibrated.mean, calibrated.var, calibrated.target_std, {**calibrated.metadata, "zero_tokens": False}
    ).save(without)
    data = load_expression(inputs["processed_h5ad"])

    def targets(latent_section, latent_stats):
        request = TrainRequest(
            **{key: inputs[key] for key in ("processed_h5ad", "split_json", "scgpt_dir", "gene_vocab_tsv")},
            out_model=tmp_path / "model.pt",
            out_loss=tmp_path / "loss.tsv",
            resume_dir=tmp_path / "resume",
            model_section=MODEL,
            train_section={},
            latent_section={"cache": "off", **latent_section},
            seed=5,
            use_latent=True,
            latent_stats=latent_stats,
        )
        return scgpt_targets(request, data, SINGLES, torch.device("cpu"), draws=1)

    assert targets({}, inputs["latent_stats"])[1] == SMALL_SCGPT_SIZES["embsize"]
    with pytest.raises(ValueError, match="calibrated with latent.zero_tokens=False, training runs with True"):
        targets({}, without)
    assert targets({"zero_tokens": False}, without)[1] == SMALL_SCGPT_SIZES["embsize"]


def test_a_run_builds_its_mean_model_settings_once(dataset, tmp_path, monkeypatch) -> None:
    """The denoiser's anchor and the mean model come from one MeanModelSettings of the run."""
    from ccfm.model import mean_model, training

    built = []
    original = mean_model.MeanModelSettings.from_sections.__func__

    def counting(cls, model, train):
        built.append((dict(model), dict(train)))
        return original(cls, model, train)

    monkeypatch.setattr(training.MeanModelSettings, "from_sections", classmethod(counting))
    processed, split = dataset
    train = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "infer_top_gene": 10, "checkpoint_every": 5}
    result = train_from_files(
        _request(processed, split, tmp_path, train),
        device="cpu",
        progress=False,
    )
    assert result.steps_run == 2 and built == [(MODEL, train)]
    assert load_model(tmp_path / "model.pt").metadata["anchor"] == "additive"
