"""One adaptation path: CCFM and State behind one interface (ccfm.adapt.adaptable), the same rules and scripts.

* both implementations have every member of the interface, with its signature, and loaded
  instances pass ``isinstance`` (State with the [state] extra);
* the adaptation path imports no State code unless State is loaded;
* the workflow resolves both paths: a dry run with State enabled lists the adapter's jobs for
  both models, and each State rule runs the script of its CCFM twin.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from ccfm.adapt.adaptable import ADAPTABLE_MODELS, AdaptableModel, ModelSpec, load_adaptable
from ccfm.state.train import HIDE_ENV, arc_state_version
from pipeline_utils import REPO_ROOT, STATE_DEMO_OVERRIDES, copy_pipeline, snakemake

GENES = [f"G{i}" for i in range(8)]
INTERFACE_METHODS = ("check_genes", "control_encoder", "encoder_provenance", "target_labels", "predict_target")
INTERFACE_ATTRIBUTES = ("method", "genes", "device", "cells_per_perturbation")


def _implementation(method: str):
    module, name = ADAPTABLE_MODELS[method]
    return getattr(importlib.import_module(module), name)


def test_the_interface_names_its_members() -> None:
    members = {name for name in dir(AdaptableModel) if not name.startswith("_")} | set(AdaptableModel.__annotations__)
    assert members == set(INTERFACE_METHODS) | set(INTERFACE_ATTRIBUTES)
    assert set(ADAPTABLE_MODELS) == {"ccfm", "state"}


@pytest.mark.parametrize("method", ["ccfm", "state"])
def test_each_implementation_has_every_member_with_its_signature(method: str) -> None:
    implementation = _implementation(method)
    for name in INTERFACE_METHODS:
        theirs = inspect.signature(getattr(AdaptableModel, name))
        ours = inspect.signature(getattr(implementation, name))
        assert list(ours.parameters) == list(theirs.parameters), (method, name)
        assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]
    for name in INTERFACE_ATTRIBUTES:
        assert hasattr(implementation, name) or name in implementation.__dataclass_fields__, (method, name)
    assert implementation.method == method and callable(implementation.load)


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no adaptable model is named 'scgpt'; known: \['ccfm', 'state'\]"):
        load_adaptable(ModelSpec("scgpt", tmp_path / "model.pt"))


def test_loaded_ccfm_is_adaptable_and_predicts_from_shifted_controls(tmp_path) -> None:
    import scipy.sparse as sp
    import torch

    from ccfm.adapt.shift import AdaptSettings
    from ccfm.data.perturbations import PerturbationVocab
    from ccfm.model.checkpoint import save_model
    from ccfm.model.training import build_denoiser

    vocab = PerturbationVocab.for_genes(GENES)
    denoiser = build_denoiser(len(GENES), {"d_model": 8, "nhead": 2, "nlayers": 1}, {}, 0, vocab, seed=0)
    save_model(tmp_path / "model.pt", denoiser, vocab)
    generate = {"cells_per_perturbation": 3, "latent_steps": 2, "expr_steps": 2, "method": "euler"}
    model = load_adaptable(ModelSpec("ccfm", tmp_path / "model.pt", generate, device="cpu"))
    assert isinstance(model, AdaptableModel)
    assert (model.method, model.genes, model.device.type, model.cells_per_perturbation) == ("ccfm", GENES, "cpu", 3)
    model.check_genes(GENES, "data")
    with pytest.raises(ValueError, match="differ from the 8 genes"):
        model.check_genes(GENES[::-1], "target.h5ad")
    settings = AdaptSettings(encoding="pooled")
    assert model.encoder_provenance(settings) == {"encoding": "pooled", "model": str(tmp_path / "model.pt")}
    assert model.control_encoder(settings)(torch.rand(4, len(GENES))).shape == (4, 8)
    assert model.target_labels(["non-targeting", "G2", "G1+G3", "NOPE"], ["G5"]) == ["G5", "G1+G3", "G2"]
    controls = sp.csr_matrix(np.random.default_rng(0).gamma(2.0, 0.5, size=(20, len(GENES))).astype(np.float32))
    shift = np.full(len(GENES), 0.5, dtype=np.float32)
    adapted = model.predict_target(controls, ["G2", "G5"], {"G5": 4}, seed=1, shift=shift)
    unadapted = model.predict_target(controls, ["G2", "G5"], {"G5": 4}, seed=1, shift=None)
    assert {k: v.shape for k, v in adapted.items()} == {"G2": (3, len(GENES)), "G5": (4, len(GENES))}
    assert not np.allclose(adapted["G2"], unadapted["G2"])  # the shift reaches the sampler
    again = model.predict_target(controls, ["G2", "G5"], {"G5": 4}, seed=1, shift=shift)
    np.testing.assert_array_equal(adapted["G2"], again["G2"])


@pytest.mark.skipif(arc_state_version() is None, reason="needs the [state] extra (pip install -e '.[state]')")
def test_loaded_state_is_adaptable_and_predicts_from_shifted_controls(tmp_path) -> None:
    import scipy.sparse as sp
    import torch

    from ccfm.adapt.shift import AdaptSettings
    from state_test_data import write_released_state_run

    write_released_state_run(tmp_path / "run", GENES, ["non-targeting", "A", "B"], tmp_path / "read")
    model = load_adaptable(ModelSpec("state", tmp_path / "run", {"cells_per_perturbation": 5}))
    assert isinstance(model, AdaptableModel)
    assert (model.method, model.genes, model.device.type, model.cells_per_perturbation) == ("state", GENES, "cpu", 5)
    with pytest.raises(ValueError, match="genes of the State model"):
        model.check_genes(GENES[:-1], "target.h5ad")
    provenance = model.encoder_provenance(AdaptSettings())
    assert provenance["encoder"] == "state basal_encoder" and provenance["model"] == str(tmp_path / "run")
    assert model.control_encoder(AdaptSettings())(torch.rand(4, len(GENES))).shape[0] == 4
    assert model.target_labels(["non-targeting", "B", "C"], ["A+B"]) == ["A+B", "B"]
    controls = sp.csr_matrix(np.random.default_rng(0).gamma(2.0, 0.5, size=(20, len(GENES))).astype(np.float32))
    shift = np.full(len(GENES), 0.5, dtype=np.float32)
    adapted = model.predict_target(controls, ["A", "B"], {"B": 2}, seed=1, shift=shift)
    unadapted = model.predict_target(controls, ["A", "B"], {"B": 2}, seed=1, shift=None)
    assert {k: v.shape for k, v in adapted.items()} == {"A": (5, len(GENES)), "B": (2, len(GENES))}
    assert not np.allclose(adapted["A"], unadapted["A"])
    assert not (tmp_path / "read").exists()


@pytest.mark.slow  # subprocess
def test_the_adaptation_path_imports_no_state_code_for_ccfm() -> None:
    code = (
        "import sys\n"
        "import ccfm.adapt.adaptable, ccfm.adapt.ccfm_model, ccfm.adapt.files, ccfm.adapt.target, ccfm.adapt.score\n"
        "import ccfm.adapt.submission\n"
        "print(sorted(m for m in sys.modules if m == 'state' or m.startswith(('state.', 'ccfm.state'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # subprocess
@pytest.mark.skipif(arc_state_version() is None, reason="needs the [state] extra (pip install -e '.[state]')")
def test_the_workflow_serves_both_models_with_the_same_rules_and_scripts(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(HIDE_ENV, raising=False)
    workdir = copy_pipeline(tmp_path, STATE_DEMO_OVERRIDES)
    # The root Snakefile plus one line that lists each rule's script once the workflow is parsed.
    (workdir / "rule_scripts.smk").write_text(
        'include: "Snakefile"\n\n\n'
        "import json\n\n"
        'Path("rule_scripts.json").write_text(json.dumps({r.name: r.script for r in workflow.rules}))\n'
    )
    dry = snakemake(workdir, "-n", "-s", "rule_scripts.smk", "results/demo/fold1/adapt_state/target_summary.tsv",
                    "results/demo/fold1/adapt/target_summary.tsv")  # fmt: skip
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    for rule, folder in (
        ("adapt_mmd", "adapt"),
        ("adapt_state", "adapt_state"),
        ("predict_target", "adapt"),
        ("predict_target_state", "adapt_state"),
        ("score_target", "adapt"),
        ("score_target_state", "adapt_state"),
    ):
        assert f"rule {rule}:" in dry.stdout, rule
        assert f"benchmarks/fold1/{folder}/{rule}.tsv" in dry.stdout, rule  # one benchmark pattern
    scripts = json.loads((workdir / "rule_scripts.json").read_text())
    for ccfm_rule, state_rule in (
        ("adapt_mmd", "adapt_state"),
        ("predict_target", "predict_target_state"),
        ("score_target", "score_target_state"),
    ):
        assert scripts[ccfm_rule] and scripts[state_rule] == scripts[ccfm_rule], (ccfm_rule, scripts[state_rule])
    script_names = {path.name for path in (REPO_ROOT / "workflow" / "scripts").glob("*.py")}
    assert not script_names & {"adapt_state.py", "predict_target_state.py", "score_target_state.py"}


def test_common_smk_imports_the_state_add_on_only_inside_a_function() -> None:
    text = (REPO_ROOT / "workflow" / "rules" / "common.smk").read_text()
    top_level = [line for line in text.splitlines() if line.startswith(("from ", "import "))]
    assert top_level and not [line for line in top_level if "ccfm.state" in line], top_level
    assert "        from ccfm.state.train import state_status" in text  # inside state_status(ds)
