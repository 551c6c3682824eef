"""Frozen scGPT as a per-gene feature extractor: cells (B, G) -> contextual features (B, G, D).

For each cell the tokens are ``<cls>`` followed by the cell's non-zero genes that have a vocab id
and, with ``zero_tokens`` (config ``latent.zero_tokens``, the default), its zero-valued mapped
genes as value-0 tokens after them; values are prepared as the checkpoint's args.json says
(``binned``: per-cell quantile bins 1..n_bins-1 of the non-zero values, 0 for zeros, ``<cls>``
carrying ``pad_value``; otherwise the values themselves). The transformer output of each gene
token is scattered back to the gene's position; genes without a vocab id (and, without
``zero_tokens``, unexpressed genes) get zero vectors. Zero tokens matter for the cascade: with
exact-zero features for unexpressed genes, stage 2 learns to read "unexpressed" from the zeros,
which generated latents never reproduce.

Batching: on CPU, encoding cells one at a time measured fastest for the whole-human architecture
(benchmarks/extraction_speed.py: ~2.6 cells/s vs ~1.5-2.2 padded, 2 shared cores; no work on
padding, attention cost grows with the square of the longest cell). On CUDA the default is
length-sorted padded micro-batches, where batching is what keeps the device busy (not measured
in this project yet: rerun the benchmark on a GPU and adjust :func:`default_batching`).
All strategies give the same features (within float tolerance): padding is masked, and binning
ties are broken by a generator seeded from the configured seed and the cell's own content, so a
cell's features never depend on which other cells share its batch.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ccfm.config import section_defaults
from ccfm.scgpt.checkpoint import load_scgpt

log = logging.getLogger(__name__)

Batching = Literal["auto", "single", "padded", "sorted"]
BATCHING_CHOICES = ("auto", "single", "padded", "sorted")

_LATENT = section_defaults("latent")


@dataclass(frozen=True)
class TokenizedCell:
    """One cell's model input: gene positions (into the G columns), vocab ids and input values."""

    positions: np.ndarray  # (n,) int64, column index of each token's gene
    token_ids: np.ndarray  # (n,) int64
    values: np.ndarray  # (n,) float32 (bin index or expression)

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])


def tie_break_draws(seed: int, token_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Uniform draws in [0, 1), one per token, for breaking binning ties.

    The generator is seeded by the run seed and a checksum of the cell's (vocab id, value) pairs,
    and draws are assigned in vocab-id order: the same cell gets the same draws whatever batch it
    is in and whatever the column order of the gene panel.
    """
    order = np.argsort(token_ids, kind="stable")
    digest = zlib.crc32(np.ascontiguousarray(token_ids[order], dtype=np.int64).tobytes())
    digest = zlib.crc32(np.ascontiguousarray(values[order], dtype=np.float32).tobytes(), digest)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, digest])
    draws = np.empty(token_ids.shape[0], dtype=np.float64)
    draws[order] = rng.random(token_ids.shape[0])
    return draws


def quantile_bin(values: np.ndarray, n_bins: int, draws: np.ndarray) -> np.ndarray:
    """Per-cell quantile binning of positive ``values`` into 1..n_bins-1 (scGPT pretraining input).

    Edges are ``n_bins - 1`` quantiles of the values; a value lying on several equal edges gets a
    bin between its left and right digitisation chosen by ``draws`` (uniform in [0, 1)), as
    scGPT does with unseeded global draws.
    """
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    bins = np.ceil(draws * (right - left) + left)
    return np.clip(bins, 1, n_bins - 1).astype(np.float32)


@contextlib.contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    """Temporarily switch PyTorch's fused transformer inference path; restores the previous setting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def default_batching(device: torch.device) -> str:
    """Fastest measured strategy per device type (benchmarks/extraction_speed.py)."""
    return "sorted" if device.type == "cuda" else "single"


@dataclass(frozen=True)
class ExtractorSettings:
    """How the extractor tokenises and batches cells.

    The config-backed fields default to the schema's ``latent`` defaults (one home for them);
    the pipeline builds its settings from the dataset's merged ``latent`` section with
    :meth:`from_latent`. ``max_tokens_per_cell=None`` keeps every token.

    Attributes:
        max_tokens_per_cell: keep at most this many genes per cell (highest expressed first).
        zero_tokens: also tokenise the cell's zero-valued mapped genes (value 0), so that every
            mapped gene gets a contextual feature.
        seed: seeds the binning tie-breaks.
        batching: ``single`` (one cell per forward), ``padded`` (all cells of a call in one padded
            batch), ``sorted`` (micro-batches of similar length) or ``auto`` (fastest per device).
        micro_batch_size: cells per forward for ``sorted``.
        autocast_bf16: run the transformer under bf16 autocast (CUDA only; off by default).
    """

    max_tokens_per_cell: int | None = _LATENT["max_tokens_per_cell"]
    zero_tokens: bool = _LATENT["zero_tokens"]
    seed: int = 0
    batching: Batching = _LATENT["batching"]
    micro_batch_size: int = 16
    autocast_bf16: bool = False

    @classmethod
    def from_latent(cls, latent: Mapping[str, Any], seed: int) -> ExtractorSettings:
        """Settings of the merged ``latent`` section (schema defaults under the given keys)."""
        merged = {**_LATENT, **latent}
        return cls(
            max_tokens_per_cell=merged["max_tokens_per_cell"],
            zero_tokens=bool(merged["zero_tokens"]),
            seed=int(seed),
            batching=merged["batching"],
        )


class ScGPTFeatureExtractor:
    """Frozen scGPT producing per-gene features for a fixed gene panel.

    Args:
        model_dir: scGPT checkpoint directory (best_model.pt, vocab.json, args.json).
        gene_vocab_ids: (G,) vocab id of each gene column, -1 where the gene is not in the vocab.
        device: torch device for the transformer.
        settings: tokenisation and batching (:class:`ExtractorSettings`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        gene_vocab_ids: np.ndarray,
        device: str | torch.device = "cpu",
        settings: ExtractorSettings = ExtractorSettings(),
    ) -> None:
        max_tokens_per_cell, batching = settings.max_tokens_per_cell, settings.batching
        if batching not in BATCHING_CHOICES:
            raise ValueError(f"batching must be one of {BATCHING_CHOICES}, got {batching!r}")
        if max_tokens_per_cell is not None and max_tokens_per_cell < 1:
            raise ValueError(f"max_tokens_per_cell must be >= 1 or None, got {max_tokens_per_cell}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.model, self.vocab, self.args = load_scgpt(self.model_dir, self.device)
        ids = np.asarray(gene_vocab_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"gene_vocab_ids must be 1-D (G,), got shape {ids.shape}")
        if ids.size and ids.max() >= len(self.vocab):
            raise ValueError(f"gene_vocab_ids contain id {ids.max()} outside the vocabulary ({len(self.vocab)} tokens)")
        self.gene_vocab_ids = ids
        self.mapped = ids >= 0
        self.n_genes = int(ids.shape[0])
        self.dim = int(self.args["embsize"])
        self.cls_id = int(self.vocab["<cls>"])
        self.pad_id = int(self.vocab[self.args["pad_token"]])
        self.pad_value = float(self.args["pad_value"])
        self.binned = self.args["input_style"] == "binned"
        self.n_bins = int(self.args["n_bins"])
        self.max_tokens_per_cell = max_tokens_per_cell
        self.seed = int(settings.seed)
        self.batching = default_batching(self.device) if batching == "auto" else batching
        self.micro_batch_size = int(settings.micro_batch_size)
        self.autocast_bf16 = bool(settings.autocast_bf16) and self.device.type == "cuda"
        self.n_capped_cells = 0
        self.zero_tokens = bool(settings.zero_tokens)
        self.model_id = self.model_dir.resolve().name

    # ------------------------------------------------------------------ tokenisation

    def tokenize(self, row: np.ndarray) -> TokenizedCell:
        """Tokens of one cell from its (G,) expression row (log1p scale or counts)."""
        if row.shape != (self.n_genes,):
            raise ValueError(f"expected an expression row of {self.n_genes} genes, got shape {row.shape}")
        positions = np.flatnonzero((row > 0) & self.mapped)
        expression = row[positions].astype(np.float32)
        token_ids = self.gene_vocab_ids[positions]
        if self.binned:
            values = quantile_bin(expression, self.n_bins, tie_break_draws(self.seed, token_ids, expression))
        else:
            values = expression
        if self.zero_tokens:
            zeros = np.flatnonzero((row <= 0) & self.mapped)
            positions = np.concatenate([positions, zeros])
            token_ids = np.concatenate([token_ids, self.gene_vocab_ids[zeros]])
            values = np.concatenate([values, np.zeros(zeros.size, dtype=np.float32)]).astype(np.float32)
            expression = np.concatenate([expression, np.zeros(zeros.size, dtype=np.float32)])
            order = np.argsort(positions, kind="stable")
            positions, token_ids, values, expression = (
                positions[order],
                token_ids[order],
                values[order],
                expression[order],
            )
        keep = self._kept_tokens(token_ids, expression)
        if keep is not None:
            positions, values, token_ids = positions[keep], values[keep], token_ids[keep]
            if self.n_capped_cells == 0:
                log.warning(
                    "cells with more than %d mapped gene tokens are truncated to their %d highest "
                    "expressed genes (latent.max_tokens_per_cell); the others get zero features",
                    self.max_tokens_per_cell,
                    self.max_tokens_per_cell,
                )
            self.n_capped_cells += 1
        return TokenizedCell(positions, token_ids, values)

    def _kept_tokens(self, token_ids: np.ndarray, expression: np.ndarray) -> np.ndarray | None:
        """Indices (sorted) of the tokens kept under the cap, or None when the cell fits."""
        cap = self.max_tokens_per_cell
        if cap is None or token_ids.size <= cap:
            return None
        # highest expressed first; ties by vocab id, so the choice ignores the column order
        keep = np.lexsort((token_ids, -expression))[:cap]
        keep.sort()
        return keep

    def covered_mask(self, expr: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, G) bool on the input's device: genes that receive features (mapped, non-zero unless
        ``zero_tokens``, within the cap)."""
        rows = expr.detach().float().cpu().numpy() if isinstance(expr, torch.Tensor) else np.asarray(expr, np.float32)
        mask = np.broadcast_to(self.mapped, rows.shape).copy() if self.zero_tokens else (rows > 0) & self.mapped
        if self.max_tokens_per_cell is not None:
            for i in np.flatnonzero(mask.sum(axis=1) > self.max_tokens_per_cell):
                positions = np.flatnonzero(mask[i])
                keep = self._kept_tokens(self.gene_vocab_ids[positions], rows[i, positions].astype(np.float32))
                mask[i] = False
                mask[i, positions[keep]] = True
        device = expr.device if isinstance(expr, torch.Tensor) else torch.device("cpu")
        return torch.from_numpy(mask).to(device)

    # ------------------------------------------------------------------ encoding

    def _encode_group(self, cells: Sequence[TokenizedCell]) -> list[torch.Tensor]:
        """Encode cells in one padded forward; return each cell's (n_i, D) gene-token features."""
        length = 1 + max(cell.n_tokens for cell in cells)
        batch = len(cells)
        src = torch.full((batch, length), self.pad_id, dtype=torch.long)
        values = torch.full((batch, length), self.pad_value, dtype=torch.float32)
        padding = torch.ones((batch, length), dtype=torch.bool)
        src[:, 0] = self.cls_id  # <cls> carries pad_value as its value, as in pretraining
        for i, cell in enumerate(cells):
            n = cell.n_tokens
            src[i, 1 : n + 1] = torch.from_numpy(cell.token_ids)
            values[i, 1 : n + 1] = torch.from_numpy(cell.values)
            padding[i, : n + 1] = False
        src, values, padding = src.to(self.device), values.to(self.device), padding.to(self.device)
        # PyTorch's CPU fast path turns padded batches into nested tensors, measured ~2x slower
        # than the plain path on CPU; one cell has no padding, and CUDA keeps the fast path
        use_fastpath = batch == 1 or self.device.type != "cpu"
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_bf16),
            mha_fastpath(use_fastpath),
        ):
            with warnings.catch_warnings():
                # PyTorch's padded fast path announces its nested-tensor prototype on every call
                warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
                output = self.model._encode(src, values, padding)
        output = output.float()
        return [output[i, 1 : cell.n_tokens + 1] for i, cell in enumerate(cells)]

    def _groups(self, cells: Sequence[TokenizedCell]) -> list[list[int]]:
        """Indices of cells encoded together, per the batching strategy (empty cells skipped)."""
        active = [i for i, cell in enumerate(cells) if cell.n_tokens > 0]
        if self.batching == "single":
            return [[i] for i in active]
        if self.batching == "padded":
            return [active] if active else []
        ordered = sorted(active, key=lambda i: cells[i].n_tokens)
        size = self.micro_batch_size
        return [ordered[k : k + size] for k in range(0, len(ordered), size)]

    def encode_cells(self, cells: Sequence[TokenizedCell]) -> list[torch.Tensor]:
        """Per cell, features (n_i, D) float32 of its tokens (empty cells: a (0, D) tensor)."""
        features: list[torch.Tensor] = [torch.zeros((0, self.dim), device=self.device) for _ in cells]
        for group in self._groups(cells):
            for index, feats in zip(group, self._encode_group([cells[i] for i in group])):
                features[index] = feats
        return features

    def extract_sparse(self, expr: torch.Tensor | np.ndarray) -> tuple[list[TokenizedCell], list[torch.Tensor]]:
        """Tokenise and encode a (B, G) batch; features only for covered genes (for the cache)."""
        rows = (
            expr.detach().float().cpu().numpy()
            if isinstance(expr, torch.Tensor)
            else np.asarray(expr, dtype=np.float32)
        )
        if rows.ndim != 2 or rows.shape[1] != self.n_genes:
            raise ValueError(f"expected expression of shape (B, {self.n_genes}), got {tuple(rows.shape)}")
        cells = [self.tokenize(row) for row in rows]
        return cells, self.encode_cells(cells)

    def extract(self, expr: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw (un-normalised) features (B, G, D) float32 on ``self.device``; zeros where not covered."""
        cells, features = self.extract_sparse(expr)
        return scatter_features(cells, features, self.n_genes, self.dim, self.device)


def scatter_features(
    cells: Sequence[TokenizedCell], features: Sequence[torch.Tensor], n_genes: int, dim: int, device: torch.device
) -> torch.Tensor:
    """Place each cell's (n_i, D) token features at its gene positions of a zero (B, G, D) tensor."""
    out = torch.zeros((len(cells), n_genes, dim), dtype=torch.float32, device=device)
    for i, (cell, feats) in enumerate(zip(cells, features)):
        if cell.n_tokens:
            out[i, torch.from_numpy(cell.positions).to(device)] = feats.to(device=device, dtype=torch.float32)
    return out
