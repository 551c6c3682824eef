"""The target perturbations to predict (``target.predict``): a YAML list, or the challenge's CSV.

The Virtual Cell Challenge hands out its perturbations as a CSV (``pert_counts_Validation.csv``:
``target_gene``, ``n_cells``, ``median_umi_per_cell``). ``target.predict`` may be such a CSV
path: ``target_gene`` names the perturbations (required), ``n_cells`` (optional) how many cells
to predict for each; other columns are ignored. A row naming the control label is dropped (the
real target controls are always part of the prediction files). Without ``n_cells`` (or with a
YAML list) every perturbation gets ``generate.cells_per_perturbation`` cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ccfm import CONTROL_LABEL
from ccfm.data.conditions import parse_condition
from ccfm.evaluate.baselines import sample_control_rows

log = logging.getLogger(__name__)


@dataclass
class TargetRequests:
    """Requested target perturbations (canonical labels, in the order given) and their cell counts."""

    labels: list[str]
    n_cells: dict[str, int] = field(default_factory=dict)  # empty: cells_per_perturbation for all
    source: str = "config"

    def cells_for(self, label: str, default: int) -> int:
        return int(self.n_cells.get(label, default))


def is_predict_csv(value: object) -> bool:
    """Whether a ``target.predict`` value is a CSV path (a string) rather than a list of labels."""
    return isinstance(value, (str, Path))


def read_predict_csv(path: str | Path, control_label: str = CONTROL_LABEL) -> TargetRequests:
    """Read a challenge-style perturbation CSV (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"target.predict names {path}, which does not exist; give the challenge's perturbation CSV "
            "(columns target_gene and optionally n_cells) or a YAML list of perturbations"
        )
    table = pd.read_csv(path)
    if "target_gene" not in table.columns:
        raise ValueError(f"{path}: no target_gene column (columns: {list(table.columns)}); it names the perturbations")
    genes = table["target_gene"]
    if genes.isna().any():
        raise ValueError(f"{path}: empty target_gene in row(s) {list(table.index[genes.isna()][:10] + 2)}")
    labels = [parse_condition(str(g), control_label=control_label).canonical for g in genes.astype(str)]
    counts: list[int] | None = None
    if "n_cells" in table.columns:
        raw = pd.to_numeric(table["n_cells"], errors="coerce")
        bad = raw.isna() | (raw < 1) | (raw != raw.round())
        if bad.any():
            rows = list(table.index[bad][:10] + 2)
            raise ValueError(f"{path}: n_cells must be a positive whole number (line(s) {rows})")
        counts = raw.astype(int).tolist()
    keep = [i for i, label in enumerate(labels) if label != CONTROL_LABEL]
    if len(keep) < len(labels):
        log.info("%s: the control row(s) are dropped (the real target controls are always included)", path)
    kept = [labels[i] for i in keep]
    duplicated = sorted({label for label in kept if kept.count(label) > 1})
    if duplicated:
        raise ValueError(f"{path}: perturbation(s) listed more than once: {duplicated[:10]}")
    if not kept:
        raise ValueError(f"{path}: lists no perturbation to predict")
    n_cells = {labels[i]: counts[i] for i in keep} if counts is not None else {}
    return TargetRequests(labels=kept, n_cells=n_cells, source=str(path))


def target_requests(value: str | Path | Sequence[str] | None, control_label: str = CONTROL_LABEL) -> TargetRequests:
    """``target.predict`` as requests: a CSV path (:func:`read_predict_csv`), a list of labels, or nothing."""
    if value is None:
        return TargetRequests(labels=[])
    if is_predict_csv(value):
        return read_predict_csv(value, control_label)
    labels = list(dict.fromkeys(parse_condition(str(v), control_label=control_label).canonical for v in value))
    return TargetRequests(labels=labels)


def counts_by_label(labels: Sequence[str], n_cells: Mapping[str, int], default: int) -> dict[str, int]:
    """Cells to predict per label: ``n_cells`` where given, else ``default``."""
    return {label: int(n_cells.get(label, default)) for label in labels}


def count_groups(labels: Sequence[str], n_cells: int | Mapping[str, int]) -> dict[int, list[str]]:
    """Labels grouped by their cell count (one group when ``n_cells`` is a single number)."""
    if not isinstance(n_cells, Mapping):
        return {int(n_cells): list(labels)}
    groups: dict[int, list[str]] = {}
    for label in labels:
        groups.setdefault(int(n_cells[label]), []).append(label)
    return dict(sorted(groups.items()))


def control_rows_per_label(
    n_controls: int, labels: Sequence[str], n_cells: int | Mapping[str, int], seed: int
) -> dict[str, np.ndarray]:
    """The control rows each label starts from: :func:`ccfm.evaluate.baselines.sample_control_rows`
    once per distinct count (with one count for all labels, exactly that function's draw)."""
    rows: dict[str, np.ndarray] = {}
    for count, group in count_groups(labels, n_cells).items():
        rows.update(sample_control_rows(n_controls, group, count, seed))
    return rows
