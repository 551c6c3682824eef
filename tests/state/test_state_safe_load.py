"""Safe loading of State run directories (ccfm.state.safe_load, ccfm.state.model file checks).

None of these needs arc-state: a refused file must be refused before any model is built.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ccfm.state.model import check_run_dir, load_state_run
from ccfm.state.safe_load import RunDirError, UnsafeFileError, load_tensor_file, load_var_dims, safe_unpickle
from ccfm.state.train import HIDE_ENV, state_status


class _WritesFile:
    """Unpickling this calls exec(), which creates ``path``: the side effect a refusal must prevent."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


class _RunsShell:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plain_var_dims() -> dict:
    return {
        "input_dim": np.int64(5),
        "gene_dim": np.int64(5),
        "hvg_dim": 0,
        "output_dim": np.int64(5),
        "pert_dim": 3,
        "batch_dim": 1,
        "gene_names": ["G1", "G2", "G3", "G4", "G5"],
        "pert_names": np.array(["non-targeting", "A", "B"]),
        "scale": np.float32(1.5),
        "weights": np.arange(4, dtype=np.float64).reshape(2, 2),
    }


def test_plain_var_dims_load_with_numpy_values(tmp_path: Path) -> None:
    path = tmp_path / "var_dims.pkl"
    path.write_bytes(pickle.dumps(_plain_var_dims()))
    loaded = load_var_dims(path)
    assert loaded["input_dim"] == 5 and isinstance(loaded["input_dim"], np.integer)
    assert loaded["gene_names"] == ["G1", "G2", "G3", "G4", "G5"]
    np.testing.assert_array_equal(loaded["weights"], np.arange(4.0).reshape(2, 2))
    assert list(loaded["pert_names"]) == ["non-targeting", "A", "B"]


@pytest.mark.parametrize("payload", [_WritesFile, _RunsShell])
def test_malicious_reduce_in_var_dims_is_refused_and_nothing_runs(tmp_path: Path, payload) -> None:
    marker = tmp_path / "side_effect"
    evil = _plain_var_dims()
    evil["gene_names"] = ["G1", payload(marker)]  # hidden inside an otherwise plain dict
    path = tmp_path / "var_dims.pkl"
    path.write_bytes(pickle.dumps(evil))
    # Control: the payload really does create the file when unpickled without restriction.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control)))
    assert control.exists()

    with pytest.raises(UnsafeFileError) as error:
        load_var_dims(path)
    message = str(error.value)
    assert str(path) in message and "refused" in message
    assert ("exec" in message) or ("system" in message)
    assert not marker.exists(), "the malicious __reduce__ ran"


def test_any_non_plain_global_is_refused() -> None:
    from collections import Counter

    with pytest.raises(UnsafeFileError, match="collections.Counter"):
        safe_unpickle(pickle.dumps({"x": Counter("ab")}), source="var_dims.pkl")
    with pytest.raises(UnsafeFileError, match="not a readable pickle"):
        safe_unpickle(b"\x80\x04garbage", source="var_dims.pkl")


def test_malicious_tensor_file_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "side_effect"
    path = tmp_path / "pert_onehot_map.pt"
    torch.save({"A": torch.ones(3), "evil": _WritesFile(marker)}, path)
    with pytest.raises(UnsafeFileError, match="weights_only=True"):
        load_tensor_file(path, "perturbation one-hot map")
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"A": torch.ones(3), "meta": {"n": np.int64(3)}}, good)
    assert torch.equal(load_tensor_file(good, "x")["A"], torch.ones(3))


def _complete_run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "state", "kwargs": {}}, "data": {"kwargs": {}}}))
    (run / "var_dims.pkl").write_bytes(pickle.dumps(_plain_var_dims()))
    torch.save({"A": torch.ones(3)}, run / "pert_onehot_map.pt")
    torch.save({"state_dict": {}}, run / "checkpoints" / "final.ckpt")
    return run


@pytest.mark.parametrize("missing", ["config.yaml", "var_dims.pkl", "pert_onehot_map.pt"])
def test_run_dir_with_a_missing_file_names_it(tmp_path: Path, missing: str) -> None:
    run = _complete_run_dir(tmp_path)
    (run / missing).unlink()
    with pytest.raises(RunDirError, match=rf"missing {missing}"):
        load_state_run(run)


def test_run_dir_without_checkpoint_names_it(tmp_path: Path) -> None:
    run = _complete_run_dir(tmp_path)
    (run / "checkpoints" / "final.ckpt").unlink()
    with pytest.raises(RunDirError, match=r"missing checkpoints/final.ckpt"):
        check_run_dir(run)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    assert check_run_dir(run).name == "last.ckpt"
    with pytest.raises(RunDirError, match="not a directory"):
        check_run_dir(tmp_path / "nowhere")


def test_run_dir_with_malicious_var_dims_is_refused_before_any_model_is_built(tmp_path: Path) -> None:
    run = _complete_run_dir(tmp_path)
    marker = tmp_path / "side_effect"
    (run / "var_dims.pkl").write_bytes(
        pickle.dumps({"input_dim": 5, "output_dim": 5, "pert_dim": 3, "x": _WritesFile(marker)})
    )
    with pytest.raises(UnsafeFileError):
        load_state_run(run)
    assert not marker.exists()


def test_other_model_kinds_are_refused(tmp_path: Path) -> None:
    run = _complete_run_dir(tmp_path)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "cpa", "kwargs": {}}, "data": {"kwargs": {}}}))
    with pytest.raises(RunDirError, match="not State's transition model"):
        load_state_run(run)


def test_state_status_says_why_it_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert state_status({"enabled": False}) == (False, "state: skipped (state.enabled is false)")
    monkeypatch.setenv(HIDE_ENV, "1")
    runs, line = state_status({"enabled": "auto"})
    assert not runs and "arc-state is not installed" in line and "[state]" in line
    with pytest.raises(RuntimeError, match="state.enabled is true but arc-state is not installed"):
        state_status({"enabled": True})
