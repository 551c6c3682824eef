"""Helpers for the end-to-end tests: run the pipeline in a scratch copy of the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ("Snakefile", "envs", "workflow", "config", "profiles")

# Smaller than the shipped demo so the end-to-end tests stay quick; same code paths.
FAST_DEMO_OVERRIDES: dict[str, Any] = {
    "simulate": {
        "n_control_cells": 600,
        "cells_per_condition": 40,
        "n_target_control_cells": 400,
        "target_cells_per_condition": 40,
        "n_target_singles": 3,
        "n_target_doubles": 2,
    },
    "train": {"steps": 60, "checkpoint_every": 30, "log_every": 10, "warmup_steps": 10},
    "generate": {"cells_per_perturbation": 24, "latent_steps": 4, "expr_steps": 4},
    "latent": {"calibration_cells": 300},
    "adapt": {"steps": 100, "eval_every": 20, "eval_cells": 256},
}
# The State tests turn the method on (the shipped demo leaves it off to stay within 5 minutes).
STATE_DEMO_OVERRIDES: dict[str, Any] = {**FAST_DEMO_OVERRIDES, "state": {"enabled": "auto", "steps": 80}}


def copy_pipeline(dest: Path, demo_overrides: dict[str, Any] | None = None) -> Path:
    """Copy the pipeline (not results) to ``dest`` and optionally shrink the demo."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PIPELINE_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / name)
    if demo_overrides:
        config_path = dest / "config" / "config.yaml"
        config = yaml.safe_load(config_path.read_text())
        demo = config["datasets"]["demo"]
        for section, values in demo_overrides.items():
            demo.setdefault(section, {}).update(values)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    """Run Snakemake (of this Python environment) in ``workdir``; output captured as text."""
    command = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def describe_failure(result: subprocess.CompletedProcess[str], workdir: Path) -> str:
    """The tail of Snakemake's output plus every rule log that mentions an error."""
    parts = [result.stdout[-4000:], result.stderr[-6000:]]
    for log in sorted((workdir / "logs").rglob("*.log")) if (workdir / "logs").exists() else []:
        text = log.read_text(errors="replace")
        if "Error" in text or "Traceback" in text:
            parts.append(f"--- {log.relative_to(workdir)}\n{text[-3000:]}")
    return "\n".join(parts)
