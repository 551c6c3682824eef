"""A Virtual Cell Challenge submission (``.vcc``) from the adapted target predictions.

The model predicts its gene panel (HVGs plus perturbed genes: the genes of ``processed.h5ad``);
a submission holds every gene of the target file, in the target file's order (18,080 for H1).
The rule ``vcc_submission`` assembles it:

* **predicted cells**: the adapted prediction (``target_pred.h5ad``) on the panel genes the
  target measures; every other target gene is *filled* (:func:`fill_outside_panel`) with the
  expression of a target control cell: the fill of predicted cell ``i`` of perturbation ``p``
  is the log1p-normalised expression, for those genes, of the control cell drawn for it
  (:func:`ccfm.adapt.requests.control_rows_per_label`, seeded). The learned shift acts on the
  panel genes only, so the adapted controls' expression outside the panel *is* the target
  controls' own: these genes are predicted as unperturbed;
* **controls**: every ``non-targeting`` cell of the target on all its genes;
* normalisation of the target file as ``preprocess_target`` does it (library size over all
  target genes, ``normalize_total(target_sum)`` + ``log1p``; log1p input is kept), read in row
  chunks of the control cells only: the target matrix is never densified;
* written by cell-eval's own ``prep`` (``cell_eval._cli._prep.strip_anndata``, what
  ``cell-eval prep`` runs after reading its inputs): its checks (control label present, gene
  list and order, at most 200,000 cells), float32, zstd-compressed h5ad plus watermark in a tar.

A one-row TSV beside it counts predicted and filled genes, cells and perturbations.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.adapt.requests import control_rows_per_label
from ccfm.io.atomic import atomic_output, write_table_atomic
from ccfm.io.h5ad import CHUNK_SIZE, iter_row_chunks, read_obs_labels, read_var
from ccfm.io.predictions import read_expression_h5ad

log = logging.getLogger(__name__)

VCC_MEMBERS = ("pred.h5ad.zst", "watermark.txt")


# --------------------------------------------------------------------------------------------
# The gene-filling rule (target side)
# --------------------------------------------------------------------------------------------


def fill_outside_panel(
    panel_cells: np.ndarray | sp.spmatrix,
    panel_genes: Sequence[str],
    target_genes: Sequence[str],
    control_cells: sp.csr_matrix,
) -> sp.csr_matrix:
    """Predicted cells on every target gene: panel genes predicted, the others filled from controls.

    ``panel_cells`` (n, len(panel_genes)) are predicted cells; ``control_cells`` (n, len(target_genes))
    are the target control cells they stand on, one per predicted cell, on all target genes.
    Column ``j`` of the result is the prediction where ``target_genes[j]`` is a panel gene and
    the control cell's value otherwise; panel genes the target lacks are dropped. CSR float32.
    """
    n = panel_cells.shape[0]
    if control_cells.shape != (n, len(target_genes)):
        raise ValueError(
            f"control cells of shape {control_cells.shape} do not match {n} predicted cells x "
            f"{len(target_genes)} target genes"
        )
    position = {gene: j for j, gene in enumerate(target_genes)}
    panel_idx = np.array([i for i, g in enumerate(panel_genes) if g in position], dtype=np.int64)
    target_idx = np.array([position[panel_genes[i]] for i in panel_idx], dtype=np.int64)
    keep = np.ones(len(target_genes), dtype=np.float32)
    keep[target_idx] = 0.0
    filled = sp.csr_matrix(control_cells, dtype=np.float32) @ sp.diags(keep, format="csr")
    predicted = sp.csr_matrix(panel_cells, dtype=np.float32)[:, panel_idx].tocoo()
    placed = sp.csr_matrix(
        (predicted.data, (predicted.row, target_idx[predicted.col])), shape=(n, len(target_genes)), dtype=np.float32
    )
    out = (filled + placed).tocsr()
    out.eliminate_zeros()
    return out


# --------------------------------------------------------------------------------------------
# Target controls on every target gene
# --------------------------------------------------------------------------------------------


def unique_target_genes(target_raw: str | Path) -> tuple[list[str], np.ndarray]:
    """The target file's genes in its order (first occurrence of a duplicated name) and their columns."""
    names = read_var(target_raw).index.astype(str)
    first = ~names.duplicated(keep="first")
    if not first.all():
        log.warning("%s: %d duplicated gene names; the first occurrence of each is used", target_raw, (~first).sum())
    return names[first].tolist(), np.flatnonzero(first)


def target_controls_all_genes(
    target_raw: str | Path,
    target_processed: str | Path,
    *,
    input_scale: str = "auto",
    target_sum: float = 10000.0,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[sp.csr_matrix, list[str]]:
    """The target's control cells on all its genes, log1p-normalised as ``preprocess_target`` does.

    Control rows are those labelled ``non-targeting`` in ``target_processed.h5ad`` (same cells,
    same order as the raw file, canonical labels). Only those rows are read, chunk by chunk.
    """
    from ccfm.data.preprocess import choose_matrix, normalize_log1p

    labels = read_obs_labels(target_processed, PERT_COLUMN).astype(str)
    rows = np.flatnonzero(labels == CONTROL_LABEL)
    if rows.size == 0:
        raise ValueError(f"{target_processed}: no {CONTROL_LABEL} cells; a submission needs the target's controls")
    genes, columns = unique_target_genes(target_raw)
    layer, scale = choose_matrix(Path(target_raw), input_scale)
    blocks = []
    for _, chunk in iter_row_chunks(target_raw, chunk_size, layer, rows=rows):
        if scale == "counts":
            totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
            chunk = normalize_log1p(chunk, totals, target_sum)
        blocks.append(sp.csr_matrix(chunk[:, columns], dtype=np.float32))
    return sp.vstack(blocks, format="csr"), genes


# --------------------------------------------------------------------------------------------
# Rule entry point: the .vcc file
# --------------------------------------------------------------------------------------------


@dataclass
class SubmissionSummary:
    """What a submission holds; one row of ``{method}_vcc.tsv``."""

    method: str
    n_target_genes: int
    n_predicted_genes: int
    n_filled_genes: int
    n_perturbations: int
    n_predicted_cells: int
    n_control_cells: int
    vcc: str


def submission_anndata(
    pred: ad.AnnData,
    controls: sp.csr_matrix,
    target_genes: Sequence[str],
    *,
    seed: int,
    perturbations: Sequence[str] = (),
) -> tuple[ad.AnnData, int]:
    """Predicted cells of ``pred`` on every target gene (:func:`fill_outside_panel`) plus all ``controls``.

    ``perturbations`` (e.g. the challenge CSV's) restricts the submission to those; empty: every
    predicted one. Returns the AnnData (CSR, ``obs["target_gene"]``) and the number of target
    genes predicted by the model (the rest are filled).
    """
    panel = [str(g) for g in pred.var_names]
    labels = pred.obs[PERT_COLUMN].astype(str).to_numpy()
    perts = [p for p in dict.fromkeys(labels) if p != CONTROL_LABEL]
    if perturbations:
        missing = [p for p in perturbations if p not in perts]
        if missing:
            raise ValueError(f"the prediction has no cells for {missing[:10]}; rerun predict_target")
        perts = list(perturbations)
    counts = {p: int((labels == p).sum()) for p in perts}
    draws = control_rows_per_label(controls.shape[0], perts, counts, seed)
    matrix = pred.X if sp.issparse(pred.X) else np.asarray(pred.X)
    blocks, obs_labels = [], []
    for pert in perts:
        cells = matrix[np.flatnonzero(labels == pert)]
        blocks.append(fill_outside_panel(cells, panel, target_genes, controls[draws[pert]]))
        obs_labels += [pert] * counts[pert]
    blocks.append(controls)
    obs_labels += [CONTROL_LABEL] * controls.shape[0]
    obs = pd.DataFrame(
        {PERT_COLUMN: pd.Categorical(obs_labels, categories=[*perts, CONTROL_LABEL])},
        index=pd.Index([str(i) for i in range(len(obs_labels))]),
    )
    adata = ad.AnnData(
        X=sp.vstack(blocks, format="csr", dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(list(target_genes), dtype=str)),
    )
    n_predicted = len(set(panel) & set(target_genes))
    return adata, n_predicted


def run_cell_eval_prep(adata: ad.AnnData, genes: Sequence[str], out_vcc: str | Path) -> None:
    """cell-eval's own ``prep`` on ``adata``; the written tar is checked (cell-eval does not check its tools)."""
    from cell_eval._cli._prep import MAX_CELL_DIM, _validate_tools_in_path, strip_anndata

    _validate_tools_in_path()
    with atomic_output(out_vcc) as tmp:
        strip_anndata(
            adata,
            output_path=str(tmp),
            genelist=list(genes),
            pert_col=PERT_COLUMN,
            ntc_name=CONTROL_LABEL,
            encoding=32,
            max_cell_dim=MAX_CELL_DIM,
            exp_gene_dim=len(genes),
        )
        if not tarfile.is_tarfile(tmp):
            raise RuntimeError(f"cell-eval prep wrote no tar archive for {out_vcc} (zstd or tar failed?)")
        with tarfile.open(tmp) as archive:
            members = sorted(archive.getnames())
        if members != sorted(VCC_MEMBERS):
            raise RuntimeError(f"cell-eval prep wrote {members} for {out_vcc}, expected {list(VCC_MEMBERS)}")


@dataclass(frozen=True)
class SubmissionFiles:
    """The adapted target prediction, the raw and the processed target files, and the two outputs."""

    pred_h5ad: str | Path
    target_raw: str | Path
    target_processed: str | Path
    vcc: str | Path
    summary_tsv: str | Path


@dataclass(frozen=True)
class SubmissionSettings:
    """``method`` names the submission; ``perturbations`` (``target.predict``) are those it holds (empty:
    every predicted one); ``input_scale``/``target_sum``/``chunk_size`` read the raw target as
    ``preprocess_target`` does."""

    method: str
    seed: int
    perturbations: Sequence[str] = ()
    input_scale: str = "auto"
    target_sum: float = 10000.0
    chunk_size: int = CHUNK_SIZE


def write_vcc_submission(files: SubmissionFiles, settings: SubmissionSettings) -> SubmissionSummary:
    """Write ``{method}.vcc`` from an adapted target prediction and its one-row summary (module docstring)."""
    pred = read_expression_h5ad(files.pred_h5ad)
    controls, genes = target_controls_all_genes(
        files.target_raw,
        files.target_processed,
        input_scale=settings.input_scale,
        target_sum=settings.target_sum,
        chunk_size=settings.chunk_size,
    )
    adata, n_predicted = submission_anndata(
        pred, controls, genes, seed=settings.seed, perturbations=settings.perturbations
    )
    labels = adata.obs[PERT_COLUMN].astype(str)
    summary = SubmissionSummary(
        method=settings.method,
        n_target_genes=len(genes),
        n_predicted_genes=n_predicted,
        n_filled_genes=len(genes) - n_predicted,
        n_perturbations=int(labels[labels != CONTROL_LABEL].nunique()),
        n_predicted_cells=int((labels != CONTROL_LABEL).sum()),
        n_control_cells=int(controls.shape[0]),
        vcc=str(files.vcc),
    )
    log.info(
        "%s: %d target genes, %d predicted by the model, %d filled with the target controls' expression; "
        "%d perturbations (%d cells) + %d control cells",
        files.vcc,
        summary.n_target_genes,
        summary.n_predicted_genes,
        summary.n_filled_genes,
        summary.n_perturbations,
        summary.n_predicted_cells,
        summary.n_control_cells,
    )
    run_cell_eval_prep(adata, genes, files.vcc)
    write_table_atomic(pd.DataFrame([asdict(summary)]), files.summary_tsv, sep="\t", index=False)
    return summary


def read_vcc(path: str | Path) -> ad.AnnData:
    """The AnnData inside a ``.vcc`` file (for checks and tests): untar, zstd-decompress, read."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vcc-") as tmp, tarfile.open(path) as archive:
        archive.extractall(tmp, filter="data")
        subprocess.run(["zstd", "-d", "-q", "-f", f"{tmp}/pred.h5ad.zst", "-o", f"{tmp}/pred.h5ad"], check=True)
        return ad.read_h5ad(f"{tmp}/pred.h5ad")


def counts_per_perturbation(adata: ad.AnnData) -> Mapping[str, int]:
    """Cells per label of a submission (controls included)."""
    return adata.obs[PERT_COLUMN].astype(str).value_counts().to_dict()
