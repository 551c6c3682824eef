"""Rerun triggers: pinning a checksum on an already-downloaded dataset reruns nothing.

config/README.md tells users to pin `md5:` after a first unverified download. Checksums used to
be rule params, so pinning one made Snakemake delete and re-download the file and redo every
result built on it. Runs the real workflow (download over plain http from a server on the loopback
address, allowed with `allow_http`, then preprocess) in a scratch directory, pins the md5 and asks
Snakemake for a dry-run: nothing may be scheduled.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture()
def served_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over http on 127.0.0.1 (an ephemeral port), and its base URL."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # subprocess
def test_pinning_an_md5_after_the_download_reruns_nothing(tmp_path: Path, served_dir: tuple[Path, str]) -> None:
    root, base_url = served_dir
    remote = root / "remote.h5ad"
    labels = ["non-targeting"] * 20 + ["A"] * 10 + ["B"] * 10 + ["A+B"] * 10
    x = np.random.default_rng(0).poisson(2.0, size=(len(labels), 12)).astype(np.float32)
    ad.AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=["A", "B"] + [f"G{i}" for i in range(10)]),
    ).write_h5ad(remote)
    dataset = {
        "source": "url",
        "url": f"{base_url}/remote.h5ad",
        "allow_http": True,
        "allow_unverified": True,
        "preprocess": {"n_top_genes": 5},
    }
    config = tmp_path / "work" / "config" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"seed": 1, "run": ["mine"], "datasets": {"mine": dataset}}))
    work = config.parents[1]
    target = "results/mine/processed.h5ad"

    first = _snakemake(work, "-c1", target)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (work / target).exists()

    dataset.pop("allow_unverified")
    dataset["md5"] = hashlib.md5(remote.read_bytes()).hexdigest()
    config.write_text(yaml.safe_dump({"seed": 1, "run": ["mine"], "datasets": {"mine": dataset}}))
    dry = _snakemake(work, "-n", target)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


def _rule_blocks() -> dict[str, str]:
    """Rule name -> its text, from the workflow's rule files.

    ``use rule A as B with:`` is A's text with the directives B's block overrides replaced.
    """
    import re

    def directives(body: str) -> dict[str, str]:
        found: dict[str, str] = {}
        name = ""
        for line in body.splitlines(keepends=True):
            start = re.match(r"    (\w+):", line)
            name = start.group(1) if start else name
            found[name] = found.get(name, "") + line
        return found

    text = "\n".join(path.read_text() for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    parts = re.split(r"^(?:rule (\w+)|use rule (\w+) as (\w+) with):", text, flags=re.M)
    blocks: dict[str, str] = {}
    for name, original, new, body in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4]):
        if name:
            blocks[name] = body
        else:
            blocks[new] = "".join({**directives(blocks[original]), **directives(body)}.values())
    return blocks


def test_every_memory_request_grows_with_the_retry_attempt() -> None:
    import re

    blocks = _rule_blocks()
    fixed = {
        name: line.strip()
        for name, body in blocks.items()
        for line in body.splitlines()
        if re.match(r"\s+mem_mb=", line) and "attempt" not in line
    }
    assert fixed == {}, "a retry after an OOM kill would get the same memory"


def test_gpu_rules_declare_a_gpu_and_the_gpu_profile_names_them() -> None:
    blocks = _rule_blocks()
    with_gpu = {name for name, body in blocks.items() if "\n        gpu=" in body}
    assert {"calibrate_latent", "train_ccfm", "predict", "adapt_mmd", "predict_target"} <= with_gpu
    profile = yaml.safe_load((ROOT / "profiles" / "gpu" / "config.v8+.yaml").read_text())
    # train_ccfm takes train.gpus from the config; every other GPU rule is pinned to one GPU
    assert {name for name, res in profile["set-resources"].items() if res.get("gpu") == 1} == with_gpu - {"train_ccfm"}
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    assert all(slurm["set-resources"][name]["slurm_partition"] == "gpu" for name in with_gpu)
    # the GPU-less test cluster rejects any gres request: its profile must zero every GPU rule
    test_profile = yaml.safe_load((ROOT / "tests" / "slurm" / "profile" / "config.v8+.yaml").read_text())
    zeroed = {name for name, res in test_profile["set-resources"].items() if res.get("gpu") == 0}
    assert zeroed == with_gpu


def test_scripts_take_their_settings_from_params_and_checks_do_not_trigger_reruns() -> None:
    """Scripts never read `snakemake.config`; what only verifies or validates is a derived param.

    A params function that takes `input` or `output` is derived for Snakemake and not tracked, so
    pinning a checksum, adding a mirror, lowering `min_shared_genes` or changing `score.profile` redoes
    nothing (the md5 case runs for real above); a plain param would rerun the job and all after it.
    """
    scripts = sorted((ROOT / "workflow" / "scripts").glob("*.py"))
    assert [path.name for path in scripts if "snakemake.config" in path.read_text()] == []
    blocks = _rule_blocks()
    derived = {
        "download_dataset": "verify=lambda wc, output: download_checks(wc.ds)",  # and its use for the target
        "preprocess_target": "checks=lambda wc, input: target_checks(wc.ds)",
        "split": "checks=lambda wc, input: fold_checks(wc.ds)",
        "scgpt_download": "settings=lambda wc, output: scgpt_settings(config)",
    }
    assert {name: line for name, line in derived.items() if line not in blocks[name]} == {}
