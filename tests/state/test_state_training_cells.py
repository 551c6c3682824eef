"""State's training data: what ``train_state_to_files`` hands to ``state tx train`` holds only the
fold's training and control cells, unchanged. arc-state itself is not run (its subprocess is
intercepted), so this runs without the ``[state]`` extra; where cell-load is installed, its own
TOML reader confirms the one training dataset."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ccfm.state import train as state_train
from training_data import write_dataset


def _override(command: list[str], key: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{key}=")]
    assert len(values) == 1, (key, command)
    return values[0]


def test_state_trains_only_on_training_and_control_cells(tmp_path: Path, monkeypatch) -> None:
    processed, split = write_dataset(tmp_path)
    split_data = json.loads(split.read_text())
    seen: dict[str, object] = {}

    def fake_run(command, **kwargs):
        # What arc-state would read, captured while the files exist.
        seen["command"] = list(command)
        toml_path = Path(_override(command, "data.kwargs.toml_config_path"))
        seen["toml"] = tomllib.loads(toml_path.read_text())
        seen["toml_path"] = toml_path
        datasets = seen["toml"]["datasets"]
        seen["cells"] = {name: ad.read_h5ad(path) for name, path in datasets.items()}
        return subprocess.CompletedProcess(command, 1, stdout="intercepted", stderr="")

    monkeypatch.setattr(state_train.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="state tx train failed"):
        files = state_train.StateTrainFiles(
            processed, split, tmp_path / "state" / "run", tmp_path / "state" / "loss.tsv"
        )
        state_train.train_state_to_files(files, {}, seed=0)

    command = seen["command"]
    assert command[1:5] == ["-m", "state", "tx", "train"]
    pert_col = _override(command, "data.kwargs.pert_col")
    control = _override(command, "data.kwargs.control_pert")
    assert control == split_data["controls"]
    # One dataset, trained on whole: nothing else is read.
    assert list(seen["toml"]["datasets"]) == list(seen["toml"]["training"]) == ["fold"]
    assert seen["toml"]["training"]["fold"] == "train"
    try:
        from cell_load.config import ExperimentConfig
    except ImportError:
        pass
    else:
        config = ExperimentConfig.from_toml(str(seen["toml_path"]))
        assert config.get_all_datasets() == {"fold"} and not config.zeroshot and not config.fewshot

    cells = seen["cells"]["fold"]
    labels = cells.obs[pert_col].astype(str)
    allowed = {*split_data["train"], control}
    assert set(labels) == allowed  # every training label and the controls, nothing held out
    assert not set(labels) & set(split_data["test"])

    # The same cells as the file's training and control rows, with the same values.
    source = ad.read_h5ad(processed)
    source_labels = source.obs["target_gene"].astype(str)
    expected = source[source_labels.isin(allowed).to_numpy()]
    assert list(cells.obs_names) == list(expected.obs_names) and cells.n_obs == 320
    assert list(cells.var_names) == list(source.var_names)
    np.testing.assert_array_equal(labels.to_numpy(), source_labels[expected.obs_names].to_numpy())
    np.testing.assert_allclose(cells.X.toarray(), expected.X.toarray(), rtol=0, atol=0)
