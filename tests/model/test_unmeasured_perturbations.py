"""Perturbations of genes outside the measured gene panel (issue 14).

A public-file-like dataset (log1p, most perturbed genes absent from var; tests/unmeasured_data.py)
runs through the functions the rules call, an unseen-and-unmeasured gene is rejected before
training, measured genes keep sharing the gene-token embedding while unmeasured ones get rows of
their own, and model files written before this change still load.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from ccfm.adapt.ccfm_model import CCFMAdaptable
from ccfm.adapt.files import AdaptInputs, ShiftFiles, adapt_to_files
from ccfm.adapt.score import TargetScoreFiles, TargetScoreSettings, score_target_to_files
from ccfm.adapt.shift import AdaptSettings
from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files
from ccfm.data.perturbations import PerturbationEncoder, PerturbationVocab, UnembeddablePerturbationError
from ccfm.data.preprocess import PreprocessSettings, TargetSettings, preprocess_dataset, preprocess_target
from ccfm.data.splits import make_split, split_for_processed, write_real, write_split
from ccfm.data.validation import UnknownPerturbationError
from ccfm.evaluate.baselines import BASELINE_METHODS, BaselineOptions, run_baseline
from ccfm.evaluate.celleval import ScoreOptions, score_prediction
from ccfm.evaluate.metrics import compact_metrics
from ccfm.io.predictions import read_expression_h5ad
from ccfm.model.checkpoint import load_model, save_model
from ccfm.model.generation import predict_to_files, prepare_generation
from ccfm.model.model import CascadedFlowModel, ModelConfig
from ccfm.model.training import TrainRequest, build_denoiser, train_from_files
from training_data import MODEL
from unmeasured_data import write_unmeasured_dataset

TRAIN = {
    "steps": 200,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 5,
    "infer_top_gene": 32,
    "checkpoint_every": 1000,
    "log_every": 10,
    "mmd": False,
}
GENERATE = {"cells_per_perturbation": 24, "expr_steps": 4, "latent_steps": 2, "method": "euler", "batch_size": 24}


def _unseen_pair(unmeasured: list[str], doubles: list[str]) -> str:
    """A double of two unmeasured genes that no cell carries (a ``predict:`` entry)."""
    present = set(doubles)
    return next(f"{a}+{b}" for i, a in enumerate(unmeasured) for b in unmeasured[i + 1 :] if f"{a}+{b}" not in present)


# ---------------------------------------------------------------- end to end


def test_public_like_dataset_runs_end_to_end(tmp_path: Path) -> None:
    data = write_unmeasured_dataset(tmp_path / "raw")
    unseen_double = _unseen_pair(data.unmeasured, data.doubles)
    predict = [unseen_double, data.unmeasured[0]]
    processed, table = tmp_path / "processed.h5ad", tmp_path / "perturbed_genes.tsv"
    summary = preprocess_dataset(
        data.raw,
        processed,
        PreprocessSettings(dataset="public_like", n_top_genes=40, chunk_size=200, predict=predict),
        perturbed_genes_tsv=table,
    )
    assert summary["input_scale"] == "log1p"
    genes = list(ad.read_h5ad(processed, backed="r").var_names)
    assert set(data.measured) <= set(genes) and not set(data.unmeasured) & set(genes)  # measured forced in
    status = pd.read_csv(table, sep="\t").set_index("status")
    assert status["n_genes"].to_dict() == {
        "measured": len(data.measured),
        "unmeasured_seen": len(data.unmeasured),
        "unmeasured_unseen": 0,
    }
    assert data.unmeasured[0] in status.loc["unmeasured_seen", "genes"]
    assert summary["perturbed_status"]["unmeasured_seen"] == len(data.unmeasured)

    split = split_for_processed(processed, fold=1, seed=0, heldout_fraction=0.3, n_folds=1)
    assert split["strategy"] == "additive" and split["test"] and split["kept_in_train_unmeasured"] == []
    split_json, real = tmp_path / "fold1.json", tmp_path / "real.h5ad"
    write_split(split, split_json)
    write_real(processed, split, real)

    model_pt = tmp_path / "ccfm" / "model.pt"
    train_from_files(
        TrainRequest(
            processed_h5ad=processed,
            split_json=split_json,
            out_model=model_pt,
            out_loss=tmp_path / "ccfm" / "loss.tsv",
            resume_dir=tmp_path / "resume",
            model_section=MODEL,
            train_section=TRAIN,
            latent_section={},
            seed=0,
            use_latent=False,
            extra_labels=predict,
        ),
        device="cpu",
        progress=False,
    )
    model = load_model(model_pt)
    assert model.genes == genes and sorted(model.vocab.unmeasured) == data.unmeasured
    assert model.denoiser.model.perturbation_encoder.unmeasured_table.num_embeddings == len(data.unmeasured)
    losses = pd.read_csv(tmp_path / "ccfm" / "loss.tsv", sep="\t")
    assert np.isfinite(losses.select_dtypes("number").to_numpy()).all()

    generation = prepare_generation(model_pt, GENERATE, device="cpu")
    outputs = {"ccfm": tmp_path / "ccfm" / "pred.h5ad"}
    predict_to_files(
        generation, processed, split_json, predict, outputs["ccfm"], tmp_path / "ccfm" / "means.csv", seed=0
    )
    for method in BASELINE_METHODS:
        outputs[method] = tmp_path / method / "pred.h5ad"
        run_baseline(
            method,
            processed,
            split_json,
            real,
            outputs[method],
            tmp_path / method / "means.csv",
            BaselineOptions(extra_labels=predict, cells_per_perturbation=24, seed=0, chunk_size=200),
        )

    real_cells = read_expression_h5ad(real)
    rows = []
    for method, path in outputs.items():
        pred = read_expression_h5ad(path)
        assert {*split["test"], *predict} <= set(pred.obs["target_gene"].astype(str)), method
        metrics = compact_metrics(pred, real_cells, top_de=10, seed=0)
        assert set(metrics["perturbation"]) == set(split["test"]), method
        values = metrics[
            ["pearson_delta_pseudobulk", "pearson_delta_top_de", "mse", "sq_mean_shift", "energy_distance"]
        ].to_numpy(dtype=float)
        assert np.isfinite(values).all(), (method, metrics)
        rows.append(
            {"method": method, **metrics[["mse", "pearson_delta_pseudobulk", "pearson_delta_top_de"]].mean().to_dict()}
        )
    scores = pd.DataFrame(rows).set_index("method")
    # the score rule's entry point (cell-eval beside the compact metrics) on the model's file
    tables = score_prediction(outputs["ccfm"], real, ScoreOptions(cell_eval_profile="minimal", top_de=10, seed=0))
    assert set(tables.results["perturbation"].astype(str)) == set(split["test"]) and len(tables.compact) == len(
        split["test"]
    )
    # The additive baseline never needed the perturbed genes' own columns: on the simulator's
    # mostly additive doubles it must still beat no-change.
    assert scores.loc["additive", "pearson_delta_pseudobulk"] > scores.loc["nochange", "pearson_delta_pseudobulk"], (
        scores
    )
    # A short training run already moves held-out doubles of mostly unmeasured genes the right way.
    assert scores.loc["ccfm", "pearson_delta_pseudobulk"] > scores.loc["nochange", "pearson_delta_pseudobulk"] + 0.2, (
        scores
    )
    _adapt_to_target(tmp_path, data, processed, model_pt, generation)
    print(
        f"\nheld-out doubles {split['test']} ({len(data.unmeasured)}/{len(data.perturbed)} perturbed genes unmeasured, "
        f"{TRAIN['steps']} training steps):\n{scores.to_string(float_format=lambda v: f'{v:.4f}')}"
    )


def _adapt_to_target(tmp_path: Path, data, processed: Path, model_pt: Path, generation) -> None:
    """Adaptation and target scoring on the same model: target perturbations of unmeasured genes."""
    target = tmp_path / "target_processed.h5ad"
    preprocess_target(data.target_raw, processed, target, TargetSettings(dataset="public_like", chunk_size=200))
    adapt = tmp_path / "adapt"
    settings = AdaptSettings(steps=20, batch_size=32, eval_every=10, eval_cells=64)
    model = CCFMAdaptable.from_generation(generation)
    adapt_to_files(
        model,
        AdaptInputs(processed, target),
        ShiftFiles(adapt / "shift.safetensors", adapt / "mmd.tsv", adapt / "history.tsv"),
        settings,
        seed=0,
    )
    outputs = TargetPredictionFiles(
        adapt / "pred.h5ad", adapt / "means.csv", adapt / "pred_un.h5ad", adapt / "means_un.csv"
    )
    labels = predict_target_to_files(model, target, adapt / "shift.safetensors", outputs, seed=0)
    assert any(gene in data.unmeasured for label in labels for gene in label.split("+")), labels
    summary = score_target_to_files(
        TargetScoreFiles(
            target, processed, adapt / "pred.h5ad", adapt / "pred_un.h5ad", adapt / "m.tsv", adapt / "s.tsv"
        ),
        TargetScoreSettings(n_cells=24, seed=0, top_de=10, cell_eval_profile=None),
    )
    assert set(summary["method"]) == {"ccfm_adapted", "ccfm_unadapted", "nochange", "additive", "cellmean"}
    assert np.isfinite(summary[["pearson_delta_pseudobulk", "mse"]].to_numpy(dtype=float)).all(), summary


# ---------------------------------------------------------------- rejection up front


def test_unseen_unmeasured_gene_is_rejected_before_training(tmp_path: Path) -> None:
    data = write_unmeasured_dataset(tmp_path / "raw")
    out = tmp_path / "out" / "processed.h5ad"
    with pytest.raises(UnknownPerturbationError) as error:
        preprocess_dataset(
            data.raw,
            out,
            PreprocessSettings(
                dataset="public_like", n_top_genes=40, chunk_size=200, predict=[f"{data.unmeasured[0]}+NOTPANEL1"]
            ),
            perturbed_genes_tsv=tmp_path / "out" / "t.tsv",
        )
    message = str(error.value)
    assert "'NOTPANEL1'" in message and "not measured" in message and "no cell perturbs it" in message
    assert "predict:" in message and "scGPT" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing written

    # target context: its predict entries may name genes the *source* cells perturb, nothing else
    processed = tmp_path / "processed.h5ad"
    preprocess_dataset(data.raw, processed, PreprocessSettings(dataset="public_like", n_top_genes=40, chunk_size=200))
    target_raw = tmp_path / "raw" / "simulated" / "target_raw.h5ad"
    target_out = tmp_path / "target_processed.h5ad"
    preprocess_target(
        target_raw,
        processed,
        target_out,
        TargetSettings(dataset="public_like", chunk_size=200, predict=[data.unmeasured[1]]),
    )
    with pytest.raises(UnknownPerturbationError, match="'NOTPANEL2' is not in the data"):
        preprocess_target(
            target_raw,
            processed,
            tmp_path / "t2.h5ad",
            TargetSettings(dataset="public_like", chunk_size=200, predict=["NOTPANEL2"]),
        )

    # the training stage re-checks (a hand-made split, a changed 'predict:'): before any step
    with pytest.raises(
        UnembeddablePerturbationError, match=r"neither measured nor perturbed in training: 'ZZ1' \(in 'ZZ1\+A'\)"
    ):
        PerturbationVocab.for_genes(["A", "B"], ["A", "U1", "A+U1"], ["B+U1", "ZZ1+A"])


def test_split_never_holds_out_the_last_training_condition_of_an_unmeasured_gene() -> None:
    conditions = ["non-targeting", "A", "B", "U", "A+B", "A+U", "B+U", "A+V", "B+V", "U+V"]
    split = make_split(conditions, fold=1, seed=0, heldout_fraction=0.6, measured_genes=["A", "B"])
    # V has no single: its doubles always train; U has one, so its doubles may be held out
    assert split["kept_in_train_unmeasured"] == ["A+V", "B+V", "U+V"]
    assert not {"A+V", "B+V", "U+V"} & set(split["test"]) and split["test"]
    singles = make_split(
        ["non-targeting", "A", "B", "C", "U", "W"], fold=1, seed=0, heldout_fraction=0.5, measured_genes=["A", "B", "C"]
    )
    assert set(singles["test"]) <= {"A", "B", "C"} and {"U", "W"} <= set(singles["train"])
    with pytest.raises(ValueError, match="every single involves a perturbed gene that is not measured"):
        make_split(["non-targeting", "U", "W"], fold=1, seed=0, heldout_fraction=0.5, measured_genes=["A"])
    # every gene measured: exactly the split made without the panel (drug datasets pass None)
    all_measured = make_split(conditions, fold=2, seed=3, heldout_fraction=0.3, measured_genes=["A", "B", "U", "V"])
    assert all_measured == make_split(conditions, fold=2, seed=3, heldout_fraction=0.3)


# ---------------------------------------------------------------- embedding rows


def _model(vocab: PerturbationVocab) -> CascadedFlowModel:
    torch.manual_seed(0)
    return CascadedFlowModel(
        ModelConfig(
            n_genes=len(vocab.genes),
            d_model=32,
            nhead=4,
            nlayers=1,
            latent_dim=0,
            n_unmeasured_genes=vocab.n_unmeasured,
        )
    )


def test_measured_genes_share_the_gene_row_and_unmeasured_get_their_own() -> None:
    vocab = PerturbationVocab.for_genes(["A", "B", "C"], ["A", "U1", "U2", "A+U1"], ["B+U2", "U1+U2"])
    assert vocab.unmeasured == ["U1", "U2"]
    assert vocab.ids("A+U1") == [0, 4] and vocab.ids("U2") == [5, 3] and vocab.padding_id == 3
    assert vocab.is_measured("A") and not vocab.is_measured("U1")
    model = _model(vocab)
    encoder = model.perturbation_encoder
    assert encoder.gene_encoder is model.gene_encoder  # the same module, not a copy
    assert encoder.unmeasured_table.num_embeddings == 2
    assert model.gene_encoder.embedding.num_embeddings == 4  # genes + padding: no row for U1/U2

    measured = vocab.batch_ids(["B+C"])
    torch.testing.assert_close(encoder(measured), model.gene_encoder(measured).mean(dim=1))
    mixed = vocab.batch_ids(["A+U1"])
    expected = (
        model.gene_encoder(torch.tensor([0]))[0]
        + encoder.unmeasured_norm(encoder.unmeasured_table(torch.tensor([0])))[0]
    ) / 2
    torch.testing.assert_close(encoder(mixed)[0], expected)
    torch.testing.assert_close(encoder(vocab.batch_ids(["U1+A"])), encoder(mixed))  # order invariance

    # gradients: a measured perturbation trains its gene's row, an unmeasured one its own row only
    # (a random readout: the plain sum of a LayerNorm output has zero gradient)
    readout = torch.randn(32, generator=torch.Generator().manual_seed(0))
    (encoder(measured) @ readout).sum().backward()
    gene_grad = model.gene_encoder.embedding.weight.grad
    assert gene_grad[1].abs().sum() > 0 and gene_grad[2].abs().sum() > 0
    # the table is in the graph even when unused (DistributedDataParallel), with zero gradient
    assert encoder.unmeasured_table.weight.grad is not None and encoder.unmeasured_table.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
    (encoder(vocab.batch_ids(["U2"])) @ readout).sum().backward()
    table_grad = encoder.unmeasured_table.weight.grad
    assert table_grad[1].abs().sum() > 0 and table_grad[0].abs().sum() == 0
    assert model.gene_encoder.embedding.weight.grad[:3].abs().sum() == 0  # only the padding row moves

    # the unmeasured row is what the model sees: changing it changes the embedding
    before = encoder(vocab.batch_ids(["U2"])).detach().clone()
    with torch.no_grad():
        encoder.unmeasured_table.weight[1] += 1.0
    assert not torch.allclose(encoder(vocab.batch_ids(["U2"])), before)


def test_unmeasured_rows_are_rejected_for_drugs() -> None:
    with pytest.raises(ValueError, match="drug model has no unmeasured genes"):
        PerturbationEncoder(torch.nn.Identity(), "drug", n_drugs=2, d_model=8, n_unmeasured=1)


# ---------------------------------------------------------------- old files


def test_old_vocab_dicts_and_model_files_still_load(tmp_path: Path) -> None:
    old = {"kind": "gene", "genes": ["A", "B"], "drugs": [], "separator": "+"}  # written before issue 14
    vocab = PerturbationVocab.from_dict(old)
    assert vocab.unmeasured == [] and vocab.ids("A+B") == [0, 1] and vocab.ids("B") == [1, 2]
    assert PerturbationVocab.from_dict(vocab.to_dict()) == vocab

    denoiser = build_denoiser(2, MODEL, {}, 0, vocab, seed=0)
    model_pt = tmp_path / "model.pt"
    save_model(model_pt, denoiser, vocab)
    payload = torch.load(model_pt, weights_only=True)
    config = json.loads(payload["model_config"])
    del config["n_unmeasured_genes"]  # an old model.pt has neither the config field ...
    payload["model_config"] = json.dumps(config)
    payload["vocab"] = json.dumps(old)  # ... nor the vocab field
    torch.save(payload, model_pt)
    loaded = load_model(model_pt)
    assert loaded.vocab == vocab and loaded.denoiser.model.config.n_unmeasured_genes == 0
    assert not hasattr(loaded.denoiser.model.perturbation_encoder, "unmeasured_table")
    assert loaded.denoiser.model.state_dict().keys() == denoiser.model.state_dict().keys()
