"""A State run directory laid out as arc-state writes it and published checkpoints carry it: optional one-hot
maps (pickled dicts of tensors), data_module.torch, the checkpoint at the top level; loaded safely, used for target
predictions from a challenge CSV and a .vcc submission. The arc-state parts skip without the [state] extra."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ccfm.state.safe_load import UnsafeFileError, load_onehot_map
from state_test_data import WritesFile


class _StorageFromBytes:
    """Names torch.storage._load_from_bytes, as a pickled tensor does, with a malicious payload as its bytes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        import torch.storage

        return (torch.storage._load_from_bytes, (self.payload,))


def test_onehot_maps_pickled_as_arc_state_writes_them_load(tmp_path: Path) -> None:
    batches = {"batch_a": torch.eye(3)[0], "batch_b": torch.eye(3)[1], "batch_c": torch.eye(3)[2]}
    with open(tmp_path / "batch_onehot_map.pkl", "wb") as handle:  # what `state tx train` does
        pickle.dump(batches, handle)
    loaded = load_onehot_map(tmp_path / "batch_onehot_map.pkl", "batch map")
    assert list(loaded) == list(batches)
    assert all(torch.equal(loaded[k], batches[k]) for k in batches)
    torch.save(batches, tmp_path / "as_pt.pt")
    assert torch.equal(load_onehot_map(tmp_path / "as_pt.pt", "map")["batch_b"], batches["batch_b"])


def test_malicious_onehot_maps_are_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "side_effect"
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"x": WritesFile(marker)}))
    with pytest.raises(UnsafeFileError, match="builtins.exec"):
        load_onehot_map(tmp_path / "a.pkl", "map")
    # The storage bytes of a pickled tensor are read with torch.load(weights_only=True), never unrestricted.
    (tmp_path / "b.pkl").write_bytes(pickle.dumps({"x": _StorageFromBytes(pickle.dumps(WritesFile(marker)))}))
    with pytest.raises(UnsafeFileError, match="b.pkl"):
        load_onehot_map(tmp_path / "b.pkl", "map")
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(["not", "a", "map"]))
    with pytest.raises(UnsafeFileError, match="mapping"):
        load_onehot_map(tmp_path / "c.pkl", "map")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# With arc-state: the released layout end to end
# ---------------------------------------------------------------------------------------------

PERTS = ["non-targeting", "A", "B", "C"]


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    pytest.importorskip("state.tx.models.state_transition", reason="needs the [state] extra (arc-state)")
    from state_test_data import write_released_state_run

    root = tmp_path_factory.mktemp("released")
    genes = [f"G{i}" for i in range(12)]
    model = write_released_state_run(root / "ST-release", genes, PERTS, root / "data_module_was_read")
    return root, root / "ST-release", model, genes


def test_released_layout_loads_with_its_optional_maps(released_run) -> None:
    from ccfm.state.model import load_state_run, predict_cells

    root, run, model, genes = released_run
    loaded = load_state_run(run)
    assert loaded.checkpoint == run / "final.ckpt"
    assert loaded.genes == genes and set(loaded.pert_map) == set(PERTS)
    assert set(loaded.cell_type_map) == {"K562", "HepG2"} and set(loaded.batch_map) == {"batch0"}
    assert not (root / "data_module_was_read").exists()
    controls = np.random.default_rng(0).gamma(2.0, 0.5, size=(8, len(genes))).astype(np.float32)
    ours = predict_cells(loaded, controls, "A")
    with torch.no_grad():
        batch = {"ctrl_cell_emb": torch.from_numpy(controls), "pert_emb": loaded.pert_map["A"].expand(8, -1)}
        theirs = model.predict_step(batch, 0, padded=False)["preds"].reshape(8, -1).clamp_min(0).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_released_run_predicts_the_csvs_counts_and_writes_a_vcc(released_run, tmp_path) -> None:
    from ccfm.adapt.adaptable import ModelSpec, load_adaptable
    from ccfm.adapt.files import save_shift
    from ccfm.adapt.submission import SubmissionFiles, SubmissionSettings, read_vcc, write_vcc_submission
    from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files
    from ccfm.data.preprocess import TargetSettings, preprocess_target

    _, run, _, genes = released_run
    rng = np.random.default_rng(4)
    source = ["non-targeting"] * 30 + ["A"] * 10 + ["B"] * 10
    x = np.log1p(rng.poisson(3.0, size=(len(source), len(genes)))).astype(np.float32)
    obs = pd.DataFrame({"target_gene": pd.Categorical(source)}, index=[f"s{i}" for i in range(len(source))])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "processed.h5ad")
    target_genes = ["EXTRA1", *genes[::-1], "EXTRA2"]  # the target's own order, two genes outside the panel
    labels = ["non-targeting"] * 40 + ["A"] * 8 + ["B"] * 8 + ["A+B"] * 8
    counts = rng.poisson(3.0, size=(len(labels), len(target_genes))).astype(np.float32)
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"t{i}" for i in range(len(labels))])
    raw = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=target_genes))
    raw.write_h5ad(tmp_path / "target_raw.h5ad")
    preprocess_target(
        tmp_path / "target_raw.h5ad", tmp_path / "processed.h5ad", tmp_path / "target.h5ad", TargetSettings(dataset="t")
    )
    save_shift(tmp_path / "shift.safetensors", torch.full((len(genes),), 0.05), genes)
    (tmp_path / "perts.csv").write_text("target_gene,n_cells,median_umi_per_cell\nA,3,1000\nB+A,7,1000\n")
    paths = [tmp_path / n for n in ("pred.h5ad", "pred_means.csv", "un.h5ad", "un_means.csv")]
    model = load_adaptable(ModelSpec("state", run, {"cells_per_perturbation": 5}))
    done = predict_target_to_files(
        model, tmp_path / "target.h5ad", tmp_path / "shift.safetensors", TargetPredictionFiles(*paths),
        requested=str(tmp_path / "perts.csv"), seed=0,
    )  # fmt: skip
    assert done == ["A", "A+B", "B"]  # the CSV's, then the observed rest (scored, not submitted)
    expected = {"A": 3, "A+B": 7, "non-targeting": 40}
    assert ad.read_h5ad(paths[0]).obs["target_gene"].astype(str).value_counts().to_dict() == {**expected, "B": 5}
    summary = write_vcc_submission(
        SubmissionFiles(
            paths[0], tmp_path / "target_raw.h5ad", tmp_path / "target.h5ad", tmp_path / "state.vcc",
            tmp_path / "state_vcc.tsv",
        ),
        SubmissionSettings(method="state", seed=0, perturbations=["A", "A+B"]),
    )  # fmt: skip
    assert (summary.n_predicted_genes, summary.n_filled_genes) == (len(genes), 2)
    vcc = read_vcc(tmp_path / "state.vcc")
    assert list(vcc.var_names) == target_genes
    assert vcc.obs["target_gene"].astype(str).value_counts().to_dict() == expected
