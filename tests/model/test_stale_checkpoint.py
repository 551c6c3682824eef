"""Stale training state: a resume checkpoint is only resumed by the very run that wrote it.

The run fingerprint covers the data (processed.h5ad, split), the latent statistics, the scGPT
checkpoint and the latent settings; a finished run's checkpoint is removed once ``model.pt`` is
written. Each test goes through ``train_from_files`` (what the train_ccfm rule calls). A run
"killed" after its last checkpoint but before ``model.pt`` is simulated by making ``save_model``
raise, which leaves the checkpoint at the final step, as a SIGKILL at that moment would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import pytest

import ccfm.model.training as training
from ccfm.model.training import CHECKPOINT_NAME, TrainRequest, train_from_files
from ccfm.scgpt.calibration import LatentStats
from scgpt_test_data import SMALL_SCGPT_SIZES, copy_checkpoint
from training_data import MODEL, tiny_scgpt_inputs, write_dataset

TRAIN = {
    "steps": 6,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 2,
    "infer_top_gene": 10,
    "checkpoint_every": 3,
    "log_every": 3,
}


class Killed(RuntimeError):
    """Stands for the SIGKILL between the last checkpoint and model.pt."""


def _run(out: Path, **kwargs: Any) -> training.TrainResult:
    return train_from_files(
        TrainRequest(
            out_model=out / "model.pt",
            out_loss=out / "loss.tsv",
            resume_dir=out / "resume",
            model_section=MODEL,
            train_section=TRAIN,
            seed=5,
            **kwargs,
        ),
        device="cpu",
        progress=False,
    )


def _killed_before_model(monkeypatch: pytest.MonkeyPatch, out: Path, **kwargs: Any) -> None:
    def killed(*args: Any, **kw: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_model", killed)
        with pytest.raises(Killed):
            _run(out, **kwargs)
    assert (out / "resume" / CHECKPOINT_NAME).exists() and not (out / "model.pt").exists()


def _plain_inputs(tmp_path: Path) -> dict[str, Any]:
    processed, split = write_dataset(tmp_path)
    return {"processed_h5ad": processed, "split_json": split, "latent_section": {}, "use_latent": False}


def test_finished_run_leaves_no_checkpoint_and_a_rerun_trains_from_step_0(tmp_path) -> None:
    inputs = _plain_inputs(tmp_path)
    first = _run(tmp_path / "out", **inputs)
    assert first.steps_run == TRAIN["steps"] and (tmp_path / "out" / "model.pt").exists()
    assert not (tmp_path / "out" / "resume" / CHECKPOINT_NAME).exists()
    # --forcerun train_ccfm: before the fix this resumed at step 6 and trained 0 steps
    again = _run(tmp_path / "out", **inputs)
    assert again.resumed_from == 0 and again.steps_run == TRAIN["steps"]


def test_unchanged_inputs_resume_the_interrupted_run(tmp_path, monkeypatch) -> None:
    """The control for the triggers below: with nothing changed the checkpoint is resumed."""
    inputs = _plain_inputs(tmp_path)
    _killed_before_model(monkeypatch, tmp_path / "out", **inputs)
    result = _run(tmp_path / "out", **inputs)
    assert result.resumed_from == TRAIN["steps"] and result.steps_run == 0
    assert (tmp_path / "out" / "model.pt").exists() and not (tmp_path / "out" / "resume" / CHECKPOINT_NAME).exists()


def test_rewritten_data_of_the_same_size_retrains(tmp_path, monkeypatch, caplog) -> None:
    inputs = _plain_inputs(tmp_path)
    _killed_before_model(monkeypatch, tmp_path / "out", **inputs)
    processed = inputs["processed_h5ad"]
    size = processed.stat().st_size
    adata = ad.read_h5ad(processed)
    adata.X = adata.X * 3  # same genes, labels and sparsity: only the values change
    adata.write_h5ad(processed)
    assert processed.stat().st_size == size  # size alone (or mtime in seconds) cannot tell
    with caplog.at_level(logging.WARNING, logger="ccfm.model.trainer"):
        result = _run(tmp_path / "out", **inputs)
    assert result.resumed_from == 0 and result.steps_run == TRAIN["steps"]
    assert "discarding" in caplog.text and "changed since it was written: processed.h5ad" in caplog.text


def test_changed_split_retrains(tmp_path, monkeypatch, caplog) -> None:
    inputs = _plain_inputs(tmp_path)
    _killed_before_model(monkeypatch, tmp_path / "out", **inputs)
    split = inputs["split_json"]
    split.write_text(split.read_text().replace('"seed": 43', '"seed": 44'))  # same lists, other file
    with caplog.at_level(logging.WARNING, logger="ccfm.model.trainer"):
        result = _run(tmp_path / "out", **inputs)
    assert result.resumed_from == 0 and "changed since it was written: split" in caplog.text


def _touch_scgpt(inputs: dict[str, Any]) -> None:
    weights = Path(inputs["scgpt_dir"]) / "best_model.pt"
    weights.write_bytes(weights.read_bytes())  # another checkpoint file in the same place


def _recalibrate(inputs: dict[str, Any]) -> None:
    stats = LatentStats.load(inputs["latent_stats"])
    LatentStats(stats.mean * 2, stats.var, stats.target_std, stats.metadata).save(inputs["latent_stats"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_recalibrate, "latent_stats.pt"),
        (_touch_scgpt, "scGPT checkpoint"),
        (lambda inputs: inputs["latent_section"].update(max_tokens_per_cell=5), "latent section"),
    ],
)
def test_latent_inputs_retrain(tmp_path, monkeypatch, caplog, tiny_scgpt_checkpoint, change, named) -> None:
    scgpt = copy_checkpoint(tiny_scgpt_checkpoint(seed=0, **SMALL_SCGPT_SIZES), tmp_path / "scgpt" / "tiny")
    found = tiny_scgpt_inputs(tmp_path, scgpt)
    inputs = {
        key: found[key] for key in ("processed_h5ad", "split_json", "scgpt_dir", "gene_vocab_tsv", "latent_stats")
    }
    inputs.update(use_latent=True, latent_section={"cache": "off", "max_tokens_per_cell": 1200})
    _killed_before_model(monkeypatch, tmp_path / "out", **inputs)
    change(inputs)
    with caplog.at_level(logging.WARNING, logger="ccfm.model.trainer"):
        result = _run(tmp_path / "out", **inputs)
    assert result.resumed_from == 0 and result.steps_run == TRAIN["steps"]
    assert f"changed since it was written: {named}" in caplog.text


def test_checkpoint_without_part_hashes_is_discarded_with_a_reason(tmp_path, monkeypatch, caplog) -> None:
    """A checkpoint from before this change (no per-part hashes) is not resumed either."""
    import torch

    inputs = _plain_inputs(tmp_path)
    _killed_before_model(monkeypatch, tmp_path / "out", **inputs)
    path = tmp_path / "out" / "resume" / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    state.pop("fingerprint_parts")
    state["fingerprint"] = "0123456789abcdef"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="ccfm.model.trainer"):
        assert _run(tmp_path / "out", **inputs).resumed_from == 0
    assert "older version or another configuration" in caplog.text
