"""Every gene of the input file in the written cells: the genes left out of modelling, written back.

``preprocess`` models a subset of the input's genes (the ``n_top_genes`` most variable, every
perturbed gene present and the ``predict:`` genes). Users and downstream tools expect the file's
genes (cell-eval wants identical ``var_names`` in prediction and real files; a challenge submission
wants every gene), so ``real.h5ad`` and every method's ``pred.h5ad`` and ``pred_means.csv`` carry
every gene of the input, in its order:

- ``modelled`` genes: the method's prediction (``real.h5ad``: the measured values);
- ``never_expressed`` genes (zero in every cell of the file, e.g. a gene panel shared with other
  screens): 0;
- ``not_selected`` genes (expressed, beyond ``n_top_genes``): the values of a source control cell,
  i.e. no change for genes no method modelled. A predicted cell takes them from the control cell
  its method records in ``obs["control_index"]`` (the baselines), else from the control cell drawn
  with the run seed and the label (for CCFM the very cell its flow started from: the same draw as
  :func:`ccfm.model.generation.predict_label`). The control cells themselves keep their values.

Values are on the log1p scale of ``processed.h5ad``: the raw input is normalised with the same
library sizes (over all genes, ``obs["library_size"]``) and ``target_sum``. ``var["modelled"]``
and ``var["gene_status"]`` mark each gene. Scores and figures read the modelled genes
(:func:`ccfm.io.predictions.read_expression_h5ad`, :func:`ccfm.io.h5ad.read_control_cells`):
they measure what the methods predicted, and the written-back genes, identical for every method,
would only dilute the differences between them.

``results/{ds}/genes.tsv`` (written by ``preprocess``) lists every input gene with its status;
:class:`GeneFill` reads it with ``processed.h5ad`` and the raw file, and is all another stage (a
target context) needs to write its cells on every gene too.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.data.gene_selection import normalize_log1p
from ccfm.io.atomic import write_table_atomic
from ccfm.io.h5ad import (
    CHUNK_SIZE,
    MODELLED_COLUMN,
    iter_row_chunks,
    read_obs_labels,
    read_obs_subset,
    read_var,
    write_h5ad_atomic,
)

log = logging.getLogger(__name__)

STATUS_COLUMN = "gene_status"
SOURCE_COLUMN = "control_index"  # obs column: the control cell (0-based, file order) a predicted cell started from
LIBRARY_SIZE_COLUMN = "library_size"
GENE_STATUS = {
    "modelled": "modelled: predicted by each method",
    "never_expressed": "zero in every cell of the input: written back as 0",
    "not_selected": "expressed but beyond preprocess.n_top_genes: written back with the source control cell's values",
}


class GeneFillError(ValueError):
    """The files a gene fill is built from do not match each other; the message names the fix."""


def gene_status_table(genes: Sequence[str], modelled: np.ndarray, never_expressed: np.ndarray) -> pd.DataFrame:
    """One row per input gene, in input order: ``gene``, ``gene_status``, ``meaning``."""
    modelled = np.asarray(modelled, dtype=bool)
    never = np.asarray(never_expressed, dtype=bool) & ~modelled
    status = np.where(modelled, "modelled", np.where(never, "never_expressed", "not_selected"))
    return pd.DataFrame(
        {"gene": [str(g) for g in genes], STATUS_COLUMN: status, "meaning": [GENE_STATUS[s] for s in status]}
    )


def gene_counts(table: pd.DataFrame) -> dict[str, int]:
    """Genes per status (every status present, zero included) plus ``input``."""
    counts = table[STATUS_COLUMN].value_counts()
    return {"input": len(table), **{status: int(counts.get(status, 0)) for status in GENE_STATUS}}


def describe_gene_counts(counts: dict[str, int]) -> str:
    """The log and report sentence: genes in, modelled, written back and why."""
    return (
        f"{counts['input']} genes in the input: {counts['modelled']} modelled; "
        f"{counts['never_expressed']} never expressed (zero in every cell; written back as 0); "
        f"{counts['not_selected']} expressed but not selected (beyond n_top_genes; written back with the "
        f"source control cell's values). Every prediction file carries all {counts['input']}, in the input's order."
    )


def write_gene_table(table: pd.DataFrame, path: str | Path) -> None:
    write_table_atomic(table, path, sep="\t", index=False)


def read_gene_table(path: str | Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", dtype={"gene": str, STATUS_COLUMN: str}, keep_default_na=False)
    if {"gene", STATUS_COLUMN} - set(table.columns):
        raise GeneFillError(f"{path}: expected columns gene and {STATUS_COLUMN}; rerun preprocess")
    return table


def _uns_ccfm(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as file:
        if "uns" not in file or "ccfm" not in file["uns"]:
            return {}
        return dict(ad.io.read_elem(file["uns"]["ccfm"]))


@dataclass
class GeneFill:
    """How to write cells on every input gene (see module doc)."""

    table: pd.DataFrame  # gene, gene_status: every input gene in input order
    raw: Path
    layer: str | None
    scale: str
    target_sum: float
    library_size: np.ndarray  # per cell of the input (counts scale; unused for log1p inputs)
    control_rows: np.ndarray  # the control cells' rows (file order)
    chunk_size: int = CHUNK_SIZE

    @classmethod
    def from_files(
        cls, genes_tsv: str | Path, processed_h5ad: str | Path, raw_h5ad: str | Path, chunk_size: int = CHUNK_SIZE
    ) -> GeneFill:
        table = read_gene_table(genes_tsv)
        processed, raw = Path(processed_h5ad), Path(raw_h5ad)
        raw_genes = read_var(raw).index.astype(str)
        if list(raw_genes) != list(table["gene"]):
            raise GeneFillError(
                f"{genes_tsv} lists other genes than {raw} ({len(table)} vs {len(raw_genes)}); the input changed "
                f"after preprocess: rerun it (snakemake reruns it when the file's modification time changes)."
            )
        modelled = list(table.loc[table[STATUS_COLUMN] == "modelled", "gene"])
        if modelled != list(read_var(processed).index.astype(str)):
            raise GeneFillError(f"{genes_tsv} and {processed} disagree on the modelled genes; rerun preprocess")
        uns = _uns_ccfm(processed)
        layer = uns.get("input_layer", "X")
        labels = read_obs_labels(processed, PERT_COLUMN)
        sizes = np.zeros(labels.size)
        scale = str(uns.get("input_scale", "log1p"))
        if scale == "counts":
            frame = read_obs_subset(processed, np.arange(labels.size), [LIBRARY_SIZE_COLUMN])
            sizes = frame[LIBRARY_SIZE_COLUMN].to_numpy(dtype=np.float64)
        return cls(
            table=table,
            raw=raw,
            layer=None if layer in (None, "X") else str(layer),
            scale=scale,
            target_sum=float(uns.get("target_sum", 1e4)),
            library_size=sizes,
            control_rows=np.flatnonzero(labels == CONTROL_LABEL),
            chunk_size=int(chunk_size),
        )

    @property
    def genes(self) -> list[str]:
        return list(self.table["gene"])

    @property
    def modelled(self) -> np.ndarray:
        return (self.table[STATUS_COLUMN] == "modelled").to_numpy()

    @property
    def counts(self) -> dict[str, int]:
        return gene_counts(self.table)

    def var(self) -> pd.DataFrame:
        """``var`` of a file on every gene: ``modelled`` and ``gene_status`` per gene."""
        return pd.DataFrame(
            {MODELLED_COLUMN: self.modelled, STATUS_COLUMN: self.table[STATUS_COLUMN].astype(str).to_numpy()},
            index=pd.Index(self.genes, dtype=str),
        )

    def _normalised(self, chunk: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
        if self.scale != "counts":
            return sp.csr_matrix(chunk, dtype=np.float32)
        return normalize_log1p(chunk, self.library_size[rows], self.target_sum)

    def iter_rows(self, rows: np.ndarray) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(position in rows, chunk)`` of the input's ``rows`` on every gene, log1p-normalised, streamed."""
        rows = np.asarray(rows, dtype=np.int64)
        for start, chunk in iter_row_chunks(self.raw, self.chunk_size, self.layer, rows=rows):
            yield start, self._normalised(chunk, rows[start : start + chunk.shape[0]])

    def control_cells(self) -> sp.csr_matrix:
        """The control cells (file order) on every gene, CSR."""
        blocks = [chunk for _, chunk in self.iter_rows(self.control_rows)]
        if not blocks:
            return sp.csr_matrix((0, len(self.table)), dtype=np.float32)
        return sp.vstack(blocks, format="csr", dtype=np.float32)

    def combine(self, modelled: sp.spmatrix | np.ndarray, source: sp.spmatrix) -> sp.csr_matrix:
        """Rows on every gene: ``modelled`` (cells x modelled genes) where modelled, ``source`` elsewhere.

        ``source`` (same cells, every gene) supplies the genes left out of modelling; never-expressed
        genes are set to 0 whatever it holds.
        """
        mask = self.modelled
        keep = ~mask & (self.table[STATUS_COLUMN] == "not_selected").to_numpy()
        positions = np.flatnonzero(mask)
        modelled = sp.csr_matrix(modelled, dtype=np.float32)
        if modelled.shape[1] != positions.size or source.shape[0] != modelled.shape[0]:
            raise GeneFillError(
                f"cannot combine {modelled.shape} modelled values with {source.shape} source rows for "
                f"{positions.size} modelled of {len(mask)} genes"
            )
        placer = sp.csr_matrix(
            (np.ones(positions.size, dtype=np.float32), (np.arange(positions.size), positions)),
            shape=(positions.size, len(mask)),
        )
        out = (sp.csr_matrix(source, dtype=np.float32) @ sp.diags(keep.astype(np.float32))) + modelled @ placer
        out = sp.csr_matrix(out, dtype=np.float32)
        out.eliminate_zeros()
        out.sort_indices()
        return out


def drawn_sources(label: str, n_cells: int, n_controls: int, seed: int) -> np.ndarray:
    """Control cells (0-based) for ``n_cells`` cells of ``label``: the seeded draw of CCFM's generation."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(label.encode())])
    return rng.choice(np.arange(n_controls), size=n_cells, replace=n_controls < n_cells)


def prediction_sources(obs: pd.DataFrame, n_controls: int, seed: int, control_label: str = CONTROL_LABEL) -> np.ndarray:
    """The source control cell of every row of a prediction file (controls: themselves, in order)."""
    labels = obs[PERT_COLUMN].astype(str).to_numpy()
    is_control = labels == control_label
    if int(is_control.sum()) != n_controls:
        raise GeneFillError(
            f"the prediction carries {int(is_control.sum())} control cells but the input has {n_controls}; "
            f"predictions must carry every real control cell of the input, in order"
        )
    sources = np.empty(labels.size, dtype=np.int64)
    sources[is_control] = np.arange(n_controls)
    if SOURCE_COLUMN in obs.columns:
        recorded = obs[SOURCE_COLUMN].to_numpy()
        sources[~is_control] = recorded[~is_control].astype(np.int64)
    else:
        for label in pd.unique(labels[~is_control]):
            rows = np.flatnonzero(labels == label)
            sources[rows] = drawn_sources(str(label), rows.size, n_controls, seed)
    if sources.size and (sources.min() < 0 or sources.max() >= n_controls):
        raise GeneFillError(f"obs[{SOURCE_COLUMN!r}] names control cells outside 0..{n_controls - 1}")
    return sources


def expand_prediction_files(
    pred_h5ad: str | Path,
    fill: GeneFill,
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    *,
    seed: int,
    control_label: str = CONTROL_LABEL,
) -> ad.AnnData:
    """Write a prediction (on the modelled genes) as ``pred.h5ad`` + ``pred_means.csv`` on every gene."""
    pred = ad.read_h5ad(pred_h5ad)
    modelled_genes = [g for g, keep in zip(fill.genes, fill.modelled) if keep]
    if list(pred.var_names.astype(str)) != modelled_genes:
        raise GeneFillError(
            f"{pred_h5ad}: its {pred.n_vars} genes are not the {len(modelled_genes)} modelled genes of the input; "
            f"predict on exactly the genes of processed.h5ad"
        )
    controls = fill.control_cells()
    sources = prediction_sources(pred.obs, controls.shape[0], seed, control_label)
    matrix = fill.combine(sp.csr_matrix(pred.X), controls[sources])
    full = ad.AnnData(X=matrix, obs=pred.obs.copy(), var=fill.var(), uns=dict(pred.uns))
    full.uns["ccfm_genes"] = {**fill.counts, "fill": "never_expressed: 0; not_selected: source control cell"}
    labels = pred.obs[PERT_COLUMN].astype(str).to_numpy()
    means = {}
    for label in pd.unique(labels[labels != control_label]):
        rows = np.flatnonzero(labels == label)
        means[label] = np.asarray(matrix[rows].mean(axis=0), dtype=np.float64).ravel()
    table = pd.DataFrame.from_dict(means, orient="index", columns=fill.genes)
    table.index.name = PERT_COLUMN
    write_h5ad_atomic(full, out_h5ad)
    write_table_atomic(table, out_means_csv)
    log.info("%s: %s", out_h5ad, describe_gene_counts(fill.counts))
    return full


@contextlib.contextmanager
def predictions_on_all_genes(
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    *,
    genes_tsv: str | Path,
    processed_h5ad: str | Path,
    raw_h5ad: str | Path,
    seed: int,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[tuple[Path, Path]]:
    """Yield temporary paths for a method's prediction on the modelled genes; then write the outputs on every gene.

    Usage in a rule script::

        with predictions_on_all_genes(out.pred, out.means, genes_tsv=..., processed_h5ad=..., raw_h5ad=..., seed=s) as (
            pred,
            means,
        ):
            method_writes_predictions(pred, means)

    Nothing is written to the outputs if the block fails; the temporaries are always removed.
    """
    out_h5ad, out_means_csv = Path(out_h5ad), Path(out_means_csv)
    out_h5ad.parent.mkdir(parents=True, exist_ok=True)
    out_means_csv.parent.mkdir(parents=True, exist_ok=True)
    for out in (out_h5ad, out_means_csv):  # left by a killed job
        for stale in out.parent.glob(f".{out.name}.modelled-*"):
            stale.unlink(missing_ok=True)
    tag = uuid.uuid4().hex[:12]
    pred_tmp = out_h5ad.parent / f".{out_h5ad.name}.modelled-{tag}.h5ad"
    means_tmp = out_means_csv.parent / f".{out_means_csv.name}.modelled-{tag}.csv"
    try:
        yield pred_tmp, means_tmp
        fill = GeneFill.from_files(genes_tsv, processed_h5ad, raw_h5ad, chunk_size=chunk_size)
        expand_prediction_files(pred_tmp, fill, out_h5ad, out_means_csv, seed=seed)
    finally:
        pred_tmp.unlink(missing_ok=True)
        means_tmp.unlink(missing_ok=True)
