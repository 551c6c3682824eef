"""Configuration: schema validation with readable errors, and per-dataset settings.

Top-level sections (``preprocess``, ``split``, ``latent``, ``model``, ``train``, ``generate``,
``score``) hold defaults; a dataset may override any key of a section in a block of the same
name. :func:`dataset_section` returns the merged view a rule should use.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"

# Sections a dataset may override, with built-in defaults (config.yaml may change them).
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "preprocess": {"n_top_genes": 5000, "target_sum": 10000, "chunk_size": 10000},
    "split": {"n_folds": 5, "folds": [1], "heldout_fraction": 0.3, "min_cells_per_perturbation": 1},
    "latent": {
        "enabled": True,
        "cache": "auto",
        "cache_max_gb": 20,
        "target_std": 1.0,
        "max_tokens_per_cell": 1200,
        "zero_tokens": True,
        "calibration_cells": 5000,
        "batch_size": 32,
        "batching": "auto",
    },
    "model": {
        "d_model": 128,
        "nhead": 8,
        "nlayers": 4,
        "bottleneck": 128,
        "dh_depth": 2,
        "dropout": 0.0,
        "fusion": "differential_perceiver",
        "mlp_ratio": 4.0,
        "anchor": "additive",
        "interaction": "kernel",
        "shrink_singles": True,
        "unseen": "meanpert",
        "interaction_hidden": 64,
        "interaction_rank": 16,
    },
    "train": {
        "steps": 200000,
        "batch_size": 48,
        "lr": 5e-5,
        "weight_decay": 0.01,
        "warmup_steps": 1000,
        "grad_clip": 1.0,
        "infer_top_gene": 1000,
        "choose_latent_p": 0.4,
        "latent_weight": 0.33,
        "mmd": True,
        "gamma": 0.5,
        "checkpoint_every": 1000,
        "log_every": 50,
        "gpus": 1,
        "time_schedule": "uniform",
        "latent_t_mean": -1.2,
        "latent_t_std": 1.0,
        "expr_t_mean": -0.4,
        "expr_t_std": 0.8,
        "stage2_noised": True,
        "noised_low": 0.75,
        "prediction": "velocity",
        "x_pred_min_denominator": 0.05,
        "eta_min": 1e-6,
        "bf16": True,
        "interaction_lr": 3e-3,
        "interaction_weight_decay": 1e-2,
        "interaction_epochs": 1500,
        "interaction_patience": 150,
        "interaction_holdout": 0.25,
        "interaction_min_doubles": 4,
    },
    "generate": {
        "cells_per_perturbation": 128,
        "method": "rk4",
        "latent_steps": 20,
        "expr_steps": 20,
        "batch_size": 256,
    },
    "score": {"profile": "full", "top_de": 20},
    "adapt": {
        "steps": 1000,
        "lr": 0.02,
        "batch_size": 128,
        "holdout_fraction": 0.2,
        "patience": 10,
        "eval_every": 25,
        "eval_cells": 1024,
        "encoding": "tokens",
    },
}

DATASET_DEFAULTS: dict[str, Any] = {
    "perturbation_column": "target_gene",
    "control_label": "non-targeting",
    "combo_separator": "+",
    "input_scale": "auto",
    "perturbation_type": "gene",
    "scgpt_model": "whole-human",
    "predict": [],
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"unknown key(s) {', '.join(map(repr, extra))} under '{where}'{hint}"
    if error.validator == "required":
        return f"'{where}' is missing a required key: {error.message}"
    if error.validator == "not" and isinstance(error.instance, str) and "enum" in (error.validator_value or {}):
        # propertyNames of `datasets`: a name that is also a rule of the workflow
        return (
            f"dataset name {error.instance!r} under '{where}' is the name of a rule of the workflow "
            f"(Snakemake creates a target rule named after each dataset, and the two would clash). "
            f"Rename the dataset, e.g. '{error.instance}_data', in 'datasets' and 'run'. Reserved "
            f"names: {', '.join(error.validator_value['enum'])}"
        )
    return f"config key '{where}': {error.message}"


def validate_config(config: Mapping[str, Any], schema_path: Path = SCHEMA_PATH) -> None:
    """Validate ``config`` against the JSON schema; raise :class:`ConfigError` naming the bad key."""
    schema = yaml.safe_load(schema_path.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  - ".join(_describe(e) for e in errors)
        raise ConfigError(f"config/config.yaml is invalid:\n  - {lines}")
    unknown = [name for name in config.get("run", []) if name not in config["datasets"]]
    if unknown:
        raise ConfigError(
            f"config key 'run' names dataset(s) {unknown} that are not declared under 'datasets' "
            f"(declared: {sorted(config['datasets'])})"
        )
    for name, ds in config["datasets"].items():
        _check_source(f"datasets.{name}", ds)
        if "target" in ds:
            _check_source(f"datasets.{name}.target", ds["target"])


def _check_source(where: str, spec: Mapping[str, Any]) -> None:
    source = spec["source"]
    if source == "path" and not spec.get("path"):
        raise ConfigError(f"config key '{where}.path' is required when source is 'path'")
    if source == "url" and "url" not in spec:
        raise ConfigError(f"config key '{where}.url' is required when source is 'url'")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a config file (used by tests and by users outside Snakemake)."""
    config = yaml.safe_load(Path(path).read_text())
    validate_config(config)
    return config


def dataset_config(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """Dataset block with defaults filled in (sections excluded: use :func:`dataset_section`)."""
    if dataset not in config["datasets"]:
        raise ConfigError(f"dataset '{dataset}' is not declared under 'datasets' in the config")
    merged = copy.deepcopy(DATASET_DEFAULTS)
    merged.update(copy.deepcopy(config["datasets"][dataset]))
    merged["name"] = dataset
    return merged


def dataset_section(config: Mapping[str, Any], dataset: str, section: str) -> dict[str, Any]:
    """Built-in defaults < top-level ``section`` < the dataset's own ``section`` block."""
    if section not in SECTION_DEFAULTS:
        raise KeyError(f"unknown config section {section!r}")
    merged = copy.deepcopy(SECTION_DEFAULTS[section])
    merged.update(copy.deepcopy(config.get(section) or {}))
    merged.update(copy.deepcopy(config["datasets"][dataset].get(section) or {}))
    return merged
