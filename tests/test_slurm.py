"""The demo pipeline submitted to a real SLURM cluster through the executor plugin.

CI starts a single-node cluster first (tests/slurm/start_local_slurm.sh, needs Debian's
slurm-wlm and munge); elsewhere the test skips, saying why.
"""

from __future__ import annotations

import shutil
import subprocess

import pandas as pd
import pytest

from pipeline_utils import FAST_DEMO_OVERRIDES, REPO_ROOT, copy_pipeline, describe_failure, snakemake

pytestmark = pytest.mark.slow

TEST_PROFILE = REPO_ROOT / "tests" / "slurm" / "profile"


def _cluster_is_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return "is UP" in ping.stdout


@pytest.mark.skipif(
    not _cluster_is_up(), reason="no SLURM cluster is running (start one with tests/slurm/start_local_slurm.sh)"
)
def test_demo_runs_through_sbatch(tmp_path):
    # train.gpus: 2 on a GPU-less cluster: each training job runs two data-parallel processes
    # (torchrun, gloo on CPU) inside one SLURM allocation of two CPUs.
    overrides = {**FAST_DEMO_OVERRIDES, "train": {**FAST_DEMO_OVERRIDES["train"], "gpus": 2}}
    workdir = copy_pipeline(tmp_path / "pipeline", overrides)
    result = snakemake(workdir, "--profile", str(TEST_PROFILE), "demo", timeout=2400)
    assert result.returncode == 0, describe_failure(result, workdir)
    train_log = (workdir / "logs/demo/fold1/ccfm/train_ccfm.log").read_text()
    assert "distributed training: 2 processes, backend gloo" in train_log

    summary = pd.read_csv(workdir / "results/demo/metrics_summary.tsv", sep="\t")
    assert {"additive", "ccfm"} <= set(summary["method"])

    # Every job went through sbatch: the executor keeps one SLURM log per job, named by job id.
    slurm_logs = workdir / ".snakemake" / "slurm_logs"
    rules_submitted = {path.name for path in slurm_logs.iterdir()}
    assert {"rule_preprocess", "rule_train_ccfm", "rule_score"} <= rules_submitted
    job_logs = list(slurm_logs.rglob("*.log"))
    assert all(log.stem.split("_")[0].isdigit() for log in job_logs)
