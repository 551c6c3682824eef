"""The mean model (additive anchor + interaction residual) and the control-anchored flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccfm import CONTROL_LABEL
from ccfm.model.checkpoint import load_model
from ccfm.model.expression import load_expression
from ccfm.model.generation import GenerateSettings, predict_label, read_control_cells
from ccfm.model.mean_model import MeanModel, MeanModelSettings, build_mean_model, match_mean, shrink_effect
from ccfm.model.training import TrainRequest, fit_mean_model, train_from_files
from training_data import MODEL, write_dataset


def test_match_mean_hits_the_target_mean_despite_the_clamp_at_zero() -> None:
    rng = np.random.default_rng(0)
    cells = np.where(rng.random((200, 6)) < 0.5, 0.0, rng.gamma(2.0, 1.0, size=(200, 6)))
    target = np.array([0.1, 0.5, 1.0, 3.0, 0.0, -0.4])
    out = match_mean(cells - 0.3, target)
    assert out.min() >= 0
    np.testing.assert_allclose(out.mean(axis=0), np.maximum(target, 0), atol=1e-5)
    # A plain shift-and-clamp would overshoot the low targets (the reason match_mean exists).
    naive = np.clip(cells + (target - cells.mean(axis=0)), 0, None).mean(axis=0)
    assert naive[0] > target[0] + 0.05


def test_shrinkage_removes_noise_sized_effects_and_keeps_large_ones() -> None:
    delta = np.array([0.02, -0.03, 1.5, -2.0, 0.0])
    shrunk = shrink_effect(delta, np.full(5, 0.05**2))
    np.testing.assert_array_equal(shrunk[[0, 1, 4]], 0.0)
    assert abs(shrunk[2] - 1.5) < 0.01 and abs(shrunk[3] + 2.0) < 0.01


def _module_screen(seed: int, interaction: str, noise: float = 0.02, joint: float = 1.0):
    """Singles in 3 modules with shared programmes; a same-module double has a module-specific residual."""
    rng = np.random.default_rng(seed)
    n_genes, genes = 60, [f"g{i}" for i in range(60)]
    programmes = rng.normal(0, 1, size=(3, n_genes)) * (rng.random((3, n_genes)) < 0.3)
    joint_programme = rng.normal(0, 1, size=(3, n_genes)) * (rng.random((3, n_genes)) < 0.3)
    control = rng.gamma(2.0, 1.0, size=n_genes)
    singles = {f"s{m}{k}": m for m in range(3) for k in range(5)}
    means = {
        name: control + programmes[m] * rng.uniform(0.8, 1.2) + rng.normal(0, noise, n_genes)
        for name, m in singles.items()
    }
    names = sorted(singles)
    doubles = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if singles[a] == singles[b]:
                residual = joint * joint_programme[singles[a]]
                doubles[f"{a}+{b}"] = means[a] + means[b] - control + residual + rng.normal(0, noise, n_genes)
    held = sorted(doubles)[::4]
    train = {k: v for k, v in {**means, **doubles}.items() if k not in held}
    settings = MeanModelSettings(interaction=interaction, shrink_singles=False)
    model, report = build_mean_model(genes, control, train, rng.normal(size=(50, n_genes)), settings, seed)
    return model, report, {k: doubles[k] for k in held}, control


@pytest.mark.parametrize("interaction", ["kernel", "network"])
def test_interaction_residual_learns_pair_level_structure(interaction: str) -> None:
    model, report, held, control = _module_screen(1, interaction)
    assert report is not None and report.n_doubles > 10
    additive_err, fitted_err = [], []
    for label, observed in held.items():
        a, b = label.split("+")
        additive = control + model.delta(a).numpy() + model.delta(b).numpy()
        additive_err.append(np.mean((additive - observed) ** 2))
        fitted_err.append(np.mean((model.mean(label).numpy() - observed) ** 2))
    # Held-out same-module doubles: r recovers most of the module's joint programme.
    assert np.mean(fitted_err) < 0.5 * np.mean(additive_err)


def test_kernel_stays_additive_when_residuals_are_noise() -> None:
    model, report, held, control = _module_screen(2, "kernel", noise=0.05, joint=0.0)
    for label in held:
        a, b = label.split("+")
        additive = model.delta(a) + model.delta(b)
        assert torch.allclose(model.delta(label), additive, atol=0.02)


def test_off_is_exactly_additive_and_unseen_singles_fall_back_to_the_mean_effect() -> None:
    model, _, held, _ = _module_screen(3, "off")
    label = next(iter(held))
    a, b = label.split("+")
    assert torch.equal(model.delta(label), model.delta(a) + model.delta(b))
    mean_effect = model.single_deltas.mean(dim=0)
    assert model.anchored("unseen") and torch.equal(model.delta("unseen"), mean_effect)
    assert torch.equal(model.delta(f"{a}+unseen"), model.delta(a) + mean_effect)
    model.settings.unseen = "embedding"
    assert not model.anchored("unseen") and model.delta("unseen") is None
    assert not model.anchored(f"{a}+unseen")


def test_mean_model_round_trips_through_its_payload() -> None:
    model, _, held, _ = _module_screen(4, "kernel")
    again = MeanModel.from_payload(model.to_payload())
    for label in held:
        torch.testing.assert_close(again.delta(label), model.delta(label))


def test_settings_reject_unknown_values() -> None:
    with pytest.raises(ValueError, match="model.anchor"):
        MeanModelSettings(anchor="median")
    with pytest.raises(ValueError, match="model.unseen"):
        MeanModelSettings(unseen="zero")
    with pytest.raises(ValueError, match="model.interaction"):
        MeanModelSettings(interaction="mlp")
    assert MeanModelSettings(interaction=False).interaction == "off"


# -- the anchored flow, end to end through the rule functions ----------------------------------

TRAIN = {
    "steps": 1,
    "batch_size": 8,
    "lr": 1e-12,
    "warmup_steps": 0,
    "infer_top_gene": 20,
    "checkpoint_every": 5,
    "mmd": False,
}


def _trained(tmp_path: Path, **model) -> tuple[Path, Path]:
    processed, split = write_dataset(tmp_path)
    model_pt = tmp_path / "model.pt"
    train_from_files(
        TrainRequest(
            processed_h5ad=processed,
            split_json=split,
            out_model=model_pt,
            out_loss=tmp_path / "loss.tsv",
            resume_dir=tmp_path / "resume",
            model_section={**MODEL, **model},
            train_section=TRAIN,
            latent_section={},
            seed=3,
            use_latent=False,
        ),
        device="cpu",
        progress=False,
    )
    return model_pt, processed


def test_untrained_anchored_model_predicts_additive_doubles_and_no_change_for_unseen_singles(tmp_path: Path) -> None:
    model_pt, processed = _trained(tmp_path, interaction="off", shrink_singles=False, unseen="embedding")
    loaded = load_model(model_pt)
    assert loaded.denoiser.settings.source == "control" and loaded.mean_model is not None
    controls = read_control_cells(processed)
    rows = np.arange(controls.matrix.shape[0])
    settings = GenerateSettings(cells_per_perturbation=64, method="euler", expr_steps=3)
    full = load_expression(processed)

    def observed(label: str) -> np.ndarray:
        return full.dense_rows(full.rows_of(label)).mean(axis=0)

    control_mean = observed(CONTROL_LABEL)
    # Held-out double G2+G3: exactly the additive mean (floored at 0), whatever the sampled controls.
    cells = predict_label(loaded, controls, rows, "G2+G3", settings, 3, torch.device("cpu"))
    additive = np.maximum(control_mean + (observed("G2") - control_mean) + (observed("G3") - control_mean), 0)
    np.testing.assert_allclose(cells.mean(axis=0), additive, atol=1e-4)
    # An unseen single (the model never saw G5 perturbed): no change, within sampling noise of 64 controls.
    unseen = predict_label(loaded, controls, rows, "G5", settings, 3, torch.device("cpu"))
    se = full.dense_rows(full.rows_of(CONTROL_LABEL)).std(axis=0) / np.sqrt(64)
    assert np.all(np.abs(unseen.mean(axis=0) - control_mean) < 4 * se + 1e-6)


def test_plain_settings_stay_available(tmp_path: Path) -> None:
    model_pt, _ = _trained(tmp_path, anchor="none")
    loaded = load_model(model_pt)
    assert loaded.denoiser.settings.source == "gaussian" and loaded.mean_model is None
    assert not loaded.denoiser.model.config.zero_init_expr_head


def test_fit_mean_model_uses_only_training_cells(tmp_path: Path) -> None:
    """Given the whole file, the held-out double's cells do not move the fitted mean model."""
    processed, split = write_dataset(tmp_path)
    train = json.loads(split.read_text())["train"]
    data = load_expression(processed)  # every cell, the held-out double G2+G3 included
    altered = load_expression(processed)
    held_out_rows = altered.rows_of("G2+G3")
    assert held_out_rows.size == 40
    matrix = altered.matrix.tolil()
    matrix[held_out_rows, :] = 5.0  # a profile no training label has
    altered.matrix = matrix.tocsr()
    assert not np.allclose(altered.dense_rows(held_out_rows), data.dense_rows(held_out_rows))

    # The unfitted MLP residual is initialised from torch's global generator, not from the seed:
    # give both fits the same global state so that only the data can differ.
    # The interaction network is fitted from two doubles on: the one training double (G0+G1) leaves
    # it off, a leaked G2+G3 would switch it on and train it.
    settings = MeanModelSettings(interaction="network", interaction_min_doubles=2, interaction_epochs=20)
    torch.manual_seed(0)
    model = fit_mean_model(data, train, settings, seed=0)
    torch.manual_seed(0)
    model_altered = fit_mean_model(altered, train, settings, seed=0)
    state, state_altered = model.state_dict(), model_altered.state_dict()
    assert state.keys() == state_altered.keys()
    for key in state:
        assert torch.equal(state[key], state_altered[key]), key
    assert model.singles == model_altered.singles
    assert set(model.singles) == {"G0", "G1", "G2", "G3"}  # the held-out double G2+G3 is no single
    assert model.anchored("G2+G3")
    assert torch.equal(model.delta("G2+G3"), model_altered.delta("G2+G3"))
    assert model.fitted_epochs == 0


def test_anchored_prediction_centres_on_the_controls_it_starts_from(tmp_path: Path) -> None:
    """In another cell context (adaptation) the predicted shift applies to that context's controls."""
    model_pt, processed = _trained(tmp_path, interaction="off")
    loaded = load_model(model_pt)
    controls = read_control_cells(processed)
    rows = np.arange(controls.matrix.shape[0])
    settings = GenerateSettings(cells_per_perturbation=32, method="euler", expr_steps=2)
    other_context = loaded.mean_model.control_mean.numpy() + 0.7  # e.g. shifted target controls
    cells = predict_label(loaded, controls, rows, "G2+G3", settings, 3, torch.device("cpu"), other_context)
    expected = np.maximum(other_context + loaded.mean_model.delta("G2+G3").numpy(), 0)
    np.testing.assert_allclose(cells.mean(axis=0), expected, atol=1e-4)


def test_network_residual_depends_on_the_seed_not_on_the_global_rng() -> None:
    torch.manual_seed(123)
    first, _, held, _ = _module_screen(1, "network")
    torch.manual_seed(999)  # another global state when the mean model is built
    second, _, _, _ = _module_screen(1, "network")
    label = next(iter(held))
    assert torch.equal(first.delta(label), second.delta(label))


def test_network_with_a_single_training_double_stays_additive() -> None:
    rng = np.random.default_rng(0)
    genes, control = [f"g{i}" for i in range(8)], rng.gamma(2.0, 1.0, size=8)
    train = {"A": control + 1.0, "B": control - 0.5, "A+B": control + 0.7}
    settings = MeanModelSettings(interaction="network", interaction_min_doubles=1, shrink_singles=False)
    model, report = build_mean_model(genes, control, train, rng.normal(size=(20, 8)), settings, 0)
    assert report is None  # nothing to hold back: r stays zero instead of failing
    assert torch.allclose(model.delta("A+B"), model.delta("A") + model.delta("B"))
