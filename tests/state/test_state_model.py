"""A State run directory built directly from arc-state's model class: loaded safely, predicted, adapted.

Needs the ``[state]`` extra (arc-state); skipped without it.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("state.tx.models.state_transition", reason="needs the [state] extra (arc-state)")

from state.tx.models.state_transition import StateTransitionPerturbationModel  # noqa: E402

from ccfm.adapt.shift import AdaptSettings, learn_shift  # noqa: E402
from ccfm.state.model import encode_basal, load_state_run, perturbation_vector, predict_cells  # noqa: E402
from ccfm.state.safe_load import UnsafeFileError  # noqa: E402

GENES = [f"G{i}" for i in range(12)]
PERTS = ["non-targeting", "A", "B", "C"]


def _hparams() -> dict:
    return dict(
        input_dim=len(GENES),
        hidden_dim=16,
        output_dim=len(GENES),
        pert_dim=len(PERTS),
        batch_dim=1,
        gene_dim=len(GENES),
        hvg_dim=0,
        embed_key=None,
        output_space="gene",
        gene_names=list(GENES),
        control_pert="non-targeting",
        basal_mapping_strategy="random",
        cell_set_len=8,
        n_encoder_layers=1,
        n_decoder_layers=1,
        predict_residual=True,
        distributional_loss="energy",
        loss="energy",
        blur=0.05,
        gene_decoder_bool=False,
        use_basal_projection=False,
        lr=1e-3,
        batch_size=2,
        loss_fn="mse",
        transformer_backbone_key="llama",
        transformer_backbone_kwargs=dict(
            bidirectional_attention=True,
            max_position_embeddings=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            use_cache=False,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            layer_norm_eps=1e-6,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rotary_dim=0,
            use_rotary_embeddings=False,
        ),
    )


def _write_run_dir(root: Path, hparams: dict | None = None) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    hparams = hparams or _hparams()
    with contextlib.redirect_stdout(io.StringIO()):
        model = StateTransitionPerturbationModel(**hparams)
    model.eval()
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "model": {"name": "state", "kwargs": {"cell_set_len": 8}},
        "data": {"kwargs": {"embed_key": None, "output_space": "gene", "control_pert": "non-targeting"}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    var_dims = {
        "input_dim": np.int64(len(GENES)),
        "gene_dim": np.int64(len(GENES)),
        "hvg_dim": 0,
        "output_dim": np.int64(len(GENES)),
        "pert_dim": len(PERTS),
        "gene_names": list(GENES),
        "batch_dim": 1,
        "pert_names": list(PERTS),
    }
    (run / "var_dims.pkl").write_bytes(pickle.dumps(var_dims))
    torch.save({name: torch.eye(len(PERTS))[i] for i, name in enumerate(PERTS)}, run / "pert_onehot_map.pt")
    # What Lightning stores: weights plus the constructor's hyper-parameters (numpy ints included).
    recorded = dict(model.hparams)
    recorded["input_dim"] = np.int64(len(GENES))
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": recorded, "epoch": 0}, run / "checkpoints" / "final.ckpt"
    )
    return run, model


def test_loaded_model_predicts_like_the_original(tmp_path: Path) -> None:
    run_dir, original = _write_run_dir(tmp_path)
    run = load_state_run(run_dir)
    assert run.genes == GENES and run.cell_set_len == 8 and run.gene_space
    controls = np.random.default_rng(0).gamma(2.0, 1.0, size=(20, len(GENES))).astype(np.float32)
    predicted = predict_cells(run, controls, "A")
    assert predicted.shape == controls.shape and (predicted >= 0).all()
    with torch.no_grad():
        first = original.predict_step(
            {"ctrl_cell_emb": torch.tensor(controls[:8]), "pert_emb": torch.eye(4)[1].expand(8, -1)}, 0, padded=False
        )
    np.testing.assert_allclose(predicted[:8], first["preds"].numpy(), rtol=1e-5, atol=1e-5)
    # An unseen double is the sum of its singles' one-hots; it changes the prediction.
    vector, unknown = perturbation_vector(run, "A+B")
    assert unknown == [] and torch.equal(vector, torch.eye(4)[1] + torch.eye(4)[2])
    assert not np.allclose(predict_cells(run, controls, "A+B"), predicted)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    run_dir, model = _write_run_dir(tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    ckpt["state_dict"]["not_a_parameter"] = torch.zeros(1)
    torch.save(ckpt, run_dir / "checkpoints" / "final.ckpt")
    with pytest.raises(Exception, match="unexpected"):
        load_state_run(run_dir)


def test_option_that_loads_further_files_is_refused(tmp_path: Path) -> None:
    run_dir, _ = _write_run_dir(tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["finetune_vci_decoder"] = True
    torch.save(ckpt, run_dir / "checkpoints" / "final.ckpt")
    with pytest.raises(UnsafeFileError, match="finetune_vci_decoder"):
        load_state_run(run_dir)


def test_shift_through_the_basal_encoder_lowers_mmd(tmp_path: Path) -> None:
    run_dir, _ = _write_run_dir(tmp_path)
    run = load_state_run(run_dir)
    rng = np.random.default_rng(1)
    source = rng.gamma(4.0, 0.5, size=(400, len(GENES))).astype(np.float32)
    offset = rng.normal(0.0, 0.8, size=len(GENES)).astype(np.float32)
    target = np.maximum(rng.gamma(4.0, 0.5, size=(400, len(GENES))).astype(np.float32) + offset, 0.0)
    settings = AdaptSettings(steps=200, lr=0.05, batch_size=64, eval_every=20)
    result = learn_shift(lambda x: encode_basal(run, x), target, source, settings, seed=0, progress=False)
    assert result.mmd_after < 0.5 * result.mmd_before
    # The learned shift undoes the offset (the encoder is applied after the shift, once).
    assert np.corrcoef(result.shift.numpy(), -offset)[0, 1] > 0.8
