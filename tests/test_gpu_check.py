"""benchmarks/gpu_check.sh in its CPU mode: the GPU check must keep working where CI has no GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow  # a subprocess that trains, extracts and generates (~20-60 s on 2 CPU cores)
def test_gpu_check_cpu_mode_writes_a_complete_report(repo_root, tmp_path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CCFM_COMMIT="test-commit")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root / "workflow"), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        ["bash", str(repo_root / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()

    assert report["mode"] == "cpu" and report["numbers_are"] == "CPU" and report["ok"] and report["failures"] == []
    if not torch.cuda.is_available():
        assert report["statement"].startswith("No CUDA GPU was found")
        assert "No CUDA GPU was found" in markdown
    assert "CPU numbers" in markdown
    env_info = report["environment"]
    assert env_info["git_commit"] == "test-commit" and env_info["torch"] == torch.__version__

    # the gpu-marked tests ran (skipped without CUDA) and the files holding them were found
    tests = report["tests"]
    assert tests["returncode"] == 0 and tests["failed"] == 0 and tests["error"] == 0
    assert "tests/model/test_cuda.py" in tests["files"] and "tests/scgpt/test_scgpt_cuda.py" in tests["files"]
    assert tests["passed"] + tests["skipped"] >= 8

    training = report["training"]
    keys = ("ccfm_fp32", "ccfm_bf16", "ccfm_bf16_cache_off", "ccfm_bf16_profile_threads", "ccfm_bf16_targets_on_device")
    for key in (*keys, "ccfm_nolatent_fp32", "ccfm_nolatent_bf16"):
        entry = training[key]
        assert entry["steps_per_s"] > 0 and math.isfinite(entry["cells_per_s"]) and entry["cells_per_s"] > 0
        assert entry["cells_per_s"] == pytest.approx(entry["steps_per_s"] * 8)  # batch 8 in CPU mode
        assert entry["losses_finite"] and entry["bf16_active"] is False and entry["peak_gpu_memory_gib"] is None
        assert entry["steps"] >= 3
    for key in keys:
        assert 0 < training[key]["latent_targets_share"] < 1
        assert training[key]["parameters"] > training["ccfm_nolatent_fp32"]["parameters"]
    assert training["ccfm_nolatent_fp32"]["latent_targets_share"] == 0
    assert training["ccfm_bf16_profile_threads"]["torch_threads"] == min(8, os.cpu_count())  # profiles/gpu
    assert training["ccfm_bf16"]["torch_threads"] == 1  # --threads default: the rule's own one thread
    # extracting scGPT features on the fly costs more of the step than reading the cache
    assert training["ccfm_bf16_cache_off"]["latent_targets_share"] > training["ccfm_bf16"]["latent_targets_share"]

    comparison = report["bf16_vs_fp32"]
    assert comparison["bf16_active"] is False and comparison["within_tolerance"]
    assert comparison["loss_fp32"] == comparison["loss_bf16"] and comparison["rel_diff"] == 0  # both fp32 on CPU
    assert comparison["tolerance_rel"] == 0.02 and "CUDA only" in comparison["note"]

    extraction = report["extraction"]
    for key in ("cold_fp32", "warm", "warm_targets_on_device"):
        assert extraction[key]["cells_per_s"] > 0 and math.isfinite(extraction[key]["cells_per_s"])
    assert extraction["cells"] > 0 and extraction["tokens_per_cell_mean"] > 0

    generation = report["generation"]
    assert generation["method"] == "rk4" and generation["latent_steps"] == generation["expr_steps"] == 20
    assert generation["ccfm_fp32"]["stages"] == 2 and generation["ccfm_nolatent_fp32"]["stages"] == 1
    assert generation["ccfm_fp32"]["evaluations_per_batch"] == 4 * (19 + 19)
    for key in ("ccfm_fp32", "ccfm_nolatent_fp32"):
        assert generation[key]["finite"] and generation[key]["shape_ok"] and generation[key]["cells_per_s"] > 0

    loss = report["loss_check"]
    assert loss["fell"] and loss["finite"] and loss["last_fifth_mean"] < loss["first_fifth_mean"]
    assert loss["relative_drop"] >= loss["required_drop"] == 0.1

    projection = report["projection"]
    assert projection["total_gpu_h"] > 0 and "NOT an estimate" in projection["label"]
    assert projection["assumptions"]["train_steps"] == 200000
    # 100k cells x 100 tokens x (32 fp16 values + a position): 0.68 GB, under the 20 GB limit
    assert projection["feature_cache_gb"] == pytest.approx(100_000 * 100 * (32 * 2 + 4) / 1e9)
    assert projection["feature_cache_used"] and projection["ccfm_training_variant"] == "ccfm_bf16"
    assert projection["train_ccfm_h"] == pytest.approx(200000 / training["ccfm_bf16"]["steps_per_s"] / 3600)


def _gpu_check_module(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_a_failed_stage_is_reported_and_fails_the_check(repo_root) -> None:
    gpu_check = _gpu_check_module(repo_root)
    report = {
        "mode": "gpu",
        "statement": "GPU found: X",
        "created_utc": "now",
        "command": "benchmarks/gpu_check.py",
        "environment": {
            "torch": "2",
            "torch_cuda_build": "13.0",
            "python": "3.12",
            "cpu_count": 16,
            "torch_threads": 1,
            "platform": "linux",
            "git_commit": "abc",
        },
        "errors": {"generation": "RuntimeError: CUDA out of memory"},
        "tests": {"command": "pytest", "summary": "5 passed", "returncode": 0, "seconds": 1.0, "passed": 5},
        "training": {
            "ccfm_fp32": {"variant": "ccfm", "precision": "fp32", "what": "cache", "error": "RuntimeError('x')"}
        },
        "bf16_vs_fp32": {
            "within_tolerance": False,
            "rel_diff": float("nan"),
            "error": "a ccfm training variant failed",
        },
        "loss_check": {"finite": True, "fell": False, "relative_drop": 0.01},
    }
    report["tests"].update(failed=0, error=0)
    failures = gpu_check.failures_of(report)
    assert "generation failed: RuntimeError: CUDA out of memory" in failures
    assert "training ccfm_fp32: RuntimeError('x')" in failures
    assert any("bf16 loss differs" in f for f in failures) and any("fell by only 0.01" in f for f in failures)
    assert "extraction did not run" in failures
    report.update(failures=failures, ok=False)
    text = gpu_check.markdown(report)
    assert "## Generation\n\nNot measured: RuntimeError: CUDA out of memory" in text
    assert "FAILED: RuntimeError('x')" in text and "bf16 vs fp32: not compared" in text
    assert "\n## Verdict\n\nFAILED: generation failed" in text


def test_norman_projection_follows_the_feature_cache_limit(repo_root) -> None:
    gpu_check = _gpu_check_module(repo_root)
    plan = gpu_check.make_plan("cuda")  # the GPU plan's sizes (no GPU needed to build it)
    assert plan.scgpt_sizes["embsize"] == 512 and plan.model["d_model"] == 128 and plan.train["batch_size"] == 48
    assert plan.speed_top_genes == 5000 and plan.generate["method"] == "rk4"
    rate = {"steps_per_s": 10.0}
    training = {
        "ccfm_bf16": {"steps_per_s": 20.0},
        "ccfm_bf16_cache_off": {"steps_per_s": 5.0},
        "ccfm_bf16_targets_on_device": rate,
        "ccfm_nolatent_bf16": rate,
    }
    extraction = {"tokens_per_cell_mean": 1200.0, "cold_fp32": {"cells_per_s": 100.0}}
    generation = {"ccfm_fp32": {"cells_per_s": 2.0}, "ccfm_nolatent_fp32": {"cells_per_s": 4.0}}
    args = gpu_check.parse_args([])
    out = gpu_check.projection(plan, training, extraction, generation, args)
    # 100k cells x 1,200 tokens x (512 fp16 values + an int32 position) = 123 GB > latent.cache_max_gb 20
    assert out["feature_cache_gb"] == pytest.approx(100_000 * 1200 * 1028 / 1e9)
    assert not out["feature_cache_used"] and out["ccfm_training_variant"] == "ccfm_bf16_cache_off"
    assert out["train_ccfm_h"] == pytest.approx(200_000 / 5.0 / 3600)
    assert out["feature_cache_build_h"] == 0.0
    assert out["generation_both_variants_h"] == pytest.approx(40 * 128 * (1 / 2.0 + 1 / 4.0) / 3600)
    assert out["total_gpu_h"] == pytest.approx(
        out["train_ccfm_h"] + out["train_ccfm_nolatent_h"] + out["generation_both_variants_h"]
    )
    small = gpu_check.projection(plan, training, {**extraction, "tokens_per_cell_mean": 100.0}, generation, args)
    assert small["feature_cache_used"] and small["train_ccfm_h"] == pytest.approx(200_000 / 20.0 / 3600)
    assert small["feature_cache_build_h"] == pytest.approx(100_000 / 100.0 / 3600)
