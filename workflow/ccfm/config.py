"""Configuration: schema validation with readable errors, and per-dataset settings.

The schema (``workflow/schemas/config.schema.yaml``) is the one source of defaults: each key's
``default:``. Top-level sections (``preprocess``, ``split``, ``latent``, ``model``, ``train``,
``generate``, ``score``, ``adapt``) may change them; a dataset may override any key of a section
in a block of the same name. :func:`dataset_section` returns the merged view a rule should use,
and :func:`settings_from` builds a settings dataclass from such a view, rejecting unknown keys.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
T = TypeVar("T")

SECTIONS = ("preprocess", "split", "latent", "model", "train", "generate", "score", "adapt", "state")


@functools.cache
def load_schema(schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """The configuration schema, read once."""
    return yaml.safe_load(schema_path.read_text())


def _defaults(definition: Mapping[str, Any]) -> dict[str, Any]:
    return {key: spec["default"] for key, spec in definition["properties"].items() if "default" in spec}


def section_keys(section: str) -> frozenset[str]:
    """Every key the schema allows in a settings section."""
    return frozenset(load_schema()["$defs"][section]["properties"])


def section_defaults(section: str) -> dict[str, Any]:
    """The schema's ``default:`` of every key of a settings section (a fresh copy)."""
    if section not in SECTIONS:
        raise KeyError(f"unknown config section {section!r}")
    return copy.deepcopy(_defaults(load_schema()["$defs"][section]))


def dataset_defaults() -> dict[str, Any]:
    """The schema's ``default:`` of the dataset-level keys (a fresh copy)."""
    return copy.deepcopy(_defaults(load_schema()["$defs"]["dataset"]))


def scgpt_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level ``scgpt`` block over the schema's defaults (``tiny`` merged key by key)."""
    schema = load_schema()["properties"]["scgpt"]
    merged = copy.deepcopy(_defaults(schema))
    merged["tiny"] = copy.deepcopy(_defaults(schema["properties"]["tiny"]))
    given = copy.deepcopy(dict(config.get("scgpt") or {}))
    merged["tiny"].update(given.pop("tiny", None) or {})
    merged.update(given)
    return merged


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
    if error.validator == "pattern" and isinstance(error.instance, str) and error.instance.endswith("_vcc"):
        # propertyNames of `datasets`: `<dataset>_vcc` is the submission target rule of a dataset
        return (
            f"dataset name {error.instance!r} under '{where}' ends in '_vcc', the suffix of each dataset's "
            f"Virtual Cell Challenge target rule ('<dataset>_vcc'); rename the dataset in 'datasets' and 'run'"
        )
    return f"config key '{where}': {error.message}"


def validate_config(config: Mapping[str, Any], schema_path: Path = SCHEMA_PATH) -> None:
    """Validate ``config`` against the JSON schema; raise :class:`ConfigError` naming the bad key."""
    schema = load_schema(schema_path)
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
        if predict_only(config, name) and not ds.get("predict"):
            raise ConfigError(
                f"dataset {name!r} has split.heldout_fraction: 0 (predict only: nothing is held out) but no "
                f"'predict:' list, so the run would predict nothing. Fix: list the perturbations to predict "
                f"under datasets.{name}.predict, or set split.heldout_fraction above 0 to hold out and score some."
            )


def predict_only(config: Mapping[str, Any], dataset: str) -> bool:
    """Whether a dataset holds nothing out (``split.heldout_fraction: 0``): train on all, predict ``predict:``."""
    return float(dataset_section(config, dataset, "split")["heldout_fraction"]) == 0


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
    merged = dataset_defaults()
    merged.update(copy.deepcopy(config["datasets"][dataset]))
    if "target" in merged:
        target_schema = load_schema()["$defs"]["dataset"]["properties"]["target"]
        merged["target"] = {**_defaults(target_schema), **merged["target"]}
    merged["name"] = dataset
    return merged


def dataset_section(config: Mapping[str, Any], dataset: str, section: str) -> dict[str, Any]:
    """Schema defaults < top-level ``section`` < the dataset's own ``section`` block."""
    merged = section_defaults(section)
    merged.update(copy.deepcopy(config.get(section) or {}))
    merged.update(copy.deepcopy(config["datasets"][dataset].get(section) or {}))
    return merged


def check_section_keys(section: str, values: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming any key of ``values`` the schema does not allow in ``section``."""
    allowed = section_keys(section)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} under '{section}'; "
            f"allowed keys here: {', '.join(sorted(allowed))}"
        )


def settings_from(cls: type[T], section: str, values: Mapping[str, Any], **fixed: Any) -> T:
    """A settings dataclass from a config section: unknown keys are an error, keys of other
    settings of the same section are left to them, ``fixed`` fields are set by the caller."""
    check_section_keys(section, values)
    fields = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in fields}, **fixed)
