"""Perturbation label parsing (ccfm.data.conditions)."""

from __future__ import annotations

import pandas as pd
import pytest

from ccfm.data.conditions import (
    CONTROL,
    ConditionError,
    canonicalize_labels,
    parse_condition,
    perturbed_names,
    split_double,
)


@pytest.mark.parametrize(
    ("label", "canonical", "kind"),
    [
        ("ctrl", CONTROL, "control"),
        ("KLF1+ctrl", "KLF1", "single"),
        ("ctrl+KLF1", "KLF1", "single"),
        ("MAP2K6+KLF1", "KLF1+MAP2K6", "double"),
        ("KLF1+MAP2K6", "KLF1+MAP2K6", "double"),
    ],
)
def test_gears_norman_conventions(label: str, canonical: str, kind: str) -> None:
    parsed = parse_condition(label, control_label="ctrl", separator="+")
    assert (parsed.canonical, parsed.condition_type) == (canonical, kind)


def test_scperturb_norman_underscore_separator() -> None:
    parse = lambda s: parse_condition(s, control_label="control", separator="_")  # noqa: E731
    assert parse("control").canonical == CONTROL
    assert parse("FEV_AHR").canonical == "AHR+FEV"
    assert parse("FEV_AHR").perturbations == ("AHR", "FEV")
    assert parse("CEBPA").condition_type == "single"
    # hyphenated HGNC symbols survive an underscore separator
    assert parse("NKX3-1_ZBTB10").canonical == "NKX3-1+ZBTB10"


def test_datlinger_guide_labels_are_not_split_into_two_genes() -> None:
    parse = lambda s: parse_condition(s, control_label="control", separator="_")  # noqa: E731
    assert parse("ZAP70_1").canonical == "ZAP70"
    assert parse("ZAP70_2").condition_type == "single"
    assert parse("EGR1_2").canonical == "EGR1"  # the gene's own digit is kept
    assert parse("control").condition_type == "control"
    # with the guide rule disabled the index is treated as a name (drugs may be numbers)
    assert parse_condition("ZAP70_1", separator="_", guide_token_pattern=None).canonical == "1+ZAP70"


def test_configured_control_label_and_case() -> None:
    assert parse_condition("NTC", control_label="NTC").canonical == CONTROL
    assert parse_condition("Non-Targeting").canonical == CONTROL
    assert parse_condition("  A+B ").canonical == "A+B"


def test_more_than_two_perturbations_is_a_clear_error() -> None:
    with pytest.raises(ConditionError, match="3 perturbations"):
        parse_condition("A+B+C")
    with pytest.raises(ConditionError, match="guide index"):
        parse_condition("1_A", separator="_")
    with pytest.raises(ConditionError, match="empty perturbation label"):
        parse_condition("  ")
    with pytest.raises(ConditionError, match="empty perturbation label"):
        parse_condition("nan")


def test_same_gene_twice_is_a_single() -> None:
    assert parse_condition("A_1+A_2", separator="_").canonical == "A"


def test_canonicalize_labels_keeps_index_and_order() -> None:
    labels = pd.Series(["ctrl", "B+A", "A+ctrl", "B+A"], index=["c1", "c2", "c3", "c4"])
    frame = canonicalize_labels(labels, control_label="ctrl")
    assert list(frame.index) == ["c1", "c2", "c3", "c4"]
    assert list(frame["target_gene"]) == [CONTROL, "A+B", "A", "A+B"]
    assert list(frame["condition_type"]) == ["control", "double", "single", "double"]
    assert list(frame["original_condition"]) == ["ctrl", "B+A", "A+ctrl", "B+A"]
    assert perturbed_names(frame["target_gene"]) == ["A", "B"]
    assert split_double("A+B") == ("A", "B")
    with pytest.raises(ConditionError):
        split_double("A")


def test_real_datlinger_labels(datlinger_h5ad) -> None:
    import anndata as ad

    obs = ad.read_h5ad(datlinger_h5ad, backed="r").obs
    frame = canonicalize_labels(obs["perturbation"], control_label="control", separator="_")
    assert set(frame["condition_type"]) == {"control", "single"}
    names = perturbed_names(frame["target_gene"])
    assert "ZAP70" in names and "EGR1" in names
    assert not any(name.isdigit() for name in names)
    assert (frame["target_gene"] == CONTROL).sum() == (obs["perturbation"] == "control").sum()
