"""Config validation: the shipped config is valid; bad keys are named in the error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ccfm.config import (
    SCHEMA_PATH,
    ConfigError,
    dataset_config,
    dataset_section,
    load_config,
    section_defaults,
    validate_config,
)

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_shipped_config_is_valid(config):
    validate_config(config)
    assert load_config(CONFIG)["run"] == config["run"]


def test_unknown_top_level_key_is_named(config):
    config["trian"] = {"steps": 10}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'trian'"):
        validate_config(config)


def test_unknown_section_key_names_its_path_and_the_allowed_keys(config):
    config.setdefault("train", {})["stepz"] = 10
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert "'stepz'" in message and "under 'train'" in message
    assert "steps" in message  # the allowed keys are listed


def test_wrong_type_names_the_key(config):
    config["datasets"]["demo"]["split"] = {"heldout_fraction": 1.5}
    with pytest.raises(ConfigError, match=r"datasets\.demo\.split\.heldout_fraction"):
        validate_config(config)


def test_run_must_name_declared_datasets(config):
    config["run"] = ["demo", "nonexistent"]
    with pytest.raises(ConfigError, match="nonexistent"):
        validate_config(config)


def test_path_source_requires_a_path(config):
    config["datasets"]["mine"] = {"source": "path"}
    with pytest.raises(ConfigError, match=r"datasets\.mine\.path"):
        validate_config(config)


def test_dataset_sections_override_top_level_defaults(config):
    config["train"] = {"lr": 1e-4}
    config["datasets"]["demo"]["train"] = {"steps": 7}
    merged = dataset_section(config, "demo", "train")
    assert merged["steps"] == 7  # dataset override
    assert merged["lr"] == 1e-4  # top-level value
    assert merged["choose_latent_p"] == 0.4  # built-in default
    other = copy.deepcopy(config)
    assert dataset_section(other, "norman", "train")["steps"] == section_defaults("train")["steps"]


def test_dataset_config_fills_defaults(config):
    merged = dataset_config(config, "demo")
    assert merged["name"] == "demo"
    assert merged["control_label"] == "non-targeting"
    with pytest.raises(ConfigError, match="not declared"):
        dataset_config(config, "nope")


def _workflow_rule_names() -> set[str]:
    import re

    root = Path(__file__).resolve().parents[1]
    text = "\n".join(
        path.read_text() for path in [root / "Snakefile", *sorted((root / "workflow" / "rules").glob("*.smk"))]
    )
    return set(re.findall(r"^rule (\w+):", text, re.M)) | set(re.findall(r"^use rule \w+ as (\w+)", text, re.M))


@pytest.mark.parametrize("name", ["split", "predict", "all", "train_ccfm", "download_target"])
def test_dataset_named_like_a_rule_is_rejected(config, name):
    config["datasets"][name] = config["datasets"].pop("demo")
    config["run"] = [name]
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    message = str(caught.value)
    assert (
        f"dataset name {name!r}" in message and "is the name of a rule" in message and "Rename the dataset" in message
    )


def test_reserved_dataset_names_are_exactly_the_rules():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    reserved = set(schema["properties"]["datasets"]["propertyNames"]["not"]["enum"])
    assert reserved == _workflow_rule_names()


def test_defaults_come_from_the_schema_only():
    from ccfm.config import load_schema, section_defaults
    from ccfm.model.denoiser import FlowSettings
    from ccfm.model.generation import GenerateSettings
    from ccfm.model.training import TrainSettings

    schema = load_schema()
    for section, cls in (("train", FlowSettings), ("train", TrainSettings), ("generate", GenerateSettings)):
        defaults = section_defaults(section)
        built = cls()
        # Every field that is a config key carries the schema's default, and every key has one.
        for key, spec in schema["$defs"][section]["properties"].items():
            assert "default" in spec, f"{section}.{key} has no default in the schema"
            if hasattr(built, key):
                assert getattr(built, key) == defaults[key], (cls.__name__, key)
    # A section merged for a rule starts from the schema defaults.
    minimal = {"seed": 1, "run": ["d"], "datasets": {"d": {"source": "simulate"}}}
    assert dataset_section(minimal, "d", "generate") == section_defaults("generate")
    assert (
        dataset_config(minimal, "d")["perturbation_column"]
        == schema["$defs"]["dataset"]["properties"]["perturbation_column"]["default"]
    )


def test_scgpt_and_target_defaults_come_from_the_schema(config):
    """The `scgpt` block and `target.min_shared_genes` take the schema's defaults, not values written in scripts."""
    import inspect

    from ccfm.config import load_schema, scgpt_settings
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint

    scgpt_schema = load_schema()["properties"]["scgpt"]["properties"]
    defaults = scgpt_settings({})
    assert defaults["whole_human_gdrive_folder"] == scgpt_schema["whole_human_gdrive_folder"]["default"]
    assert defaults["whole_human_url"] is None and defaults["whole_human_sha256"] is None
    # The tiny model's schema defaults are those of the builder's signature.
    signature = inspect.signature(build_tiny_checkpoint).parameters
    assert defaults["tiny"] == {key: signature[key].default for key in ("embsize", "nlayers", "nheads", "d_hid")}
    # A user's block overrides key by key, `tiny` included.
    merged = scgpt_settings({"scgpt": {"whole_human_url": "https://mirror", "tiny": {"nlayers": 3}}})
    assert merged["whole_human_url"] == "https://mirror" and merged["tiny"] == {**defaults["tiny"], "nlayers": 3}
    # No script carries its own copy of a default.
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    for name in ("scgpt_download.py", "scgpt_build_tiny.py", "preprocess_target.py"):
        text = (scripts / name).read_text()
        assert "1oWh_" not in text and '.get("min_shared_genes"' not in text, name

    target_schema = load_schema()["$defs"]["dataset"]["properties"]["target"]["properties"]
    config["datasets"]["demo"]["target"] = {"source": "simulate"}
    assert dataset_config(config, "demo")["target"]["min_shared_genes"] == target_schema["min_shared_genes"]["default"]
    config["datasets"]["demo"]["target"]["min_shared_genes"] = 0.8
    assert dataset_config(config, "demo")["target"]["min_shared_genes"] == 0.8


@pytest.mark.parametrize(
    ("loader", "section"),
    [
        ("ccfm.model.denoiser:FlowSettings.from_train_section", "train"),
        ("ccfm.model.training:TrainSettings.from_train_section", "train"),
        ("ccfm.model.generation:GenerateSettings.from_section", "generate"),
        ("ccfm.adapt.shift:AdaptSettings.from_mapping", "adapt"),
    ],
)
def test_every_settings_loader_rejects_unknown_keys_the_same_way(loader, section):
    import importlib

    module, attribute = loader.split(":")
    owner, method = attribute.split(".")
    load = getattr(getattr(importlib.import_module(module), owner), method)
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\) 'stepz' under '{section}'; allowed keys here: "):
        load({"stepz": 3})


def test_mean_model_settings_reject_unknown_keys_of_either_section():
    from ccfm.model.mean_model import MeanModelSettings

    with pytest.raises(ConfigError, match="under 'model'"):
        MeanModelSettings.from_sections({"anchr": "additive"}, {})
    with pytest.raises(ConfigError, match="under 'train'"):
        MeanModelSettings.from_sections({}, {"interaction_lrr": 1.0})
