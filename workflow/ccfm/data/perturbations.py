"""Perturbation vocabulary and embedding: up to two perturbations per cell, order-invariant.

*CRISPR genes* have a perturbation vocabulary of their own, separate from the expression panel:
every gene named in a training label, a held-out label or a ``predict:`` entry gets an id.

- A *measured* gene (one of the dataset's expression columns) is embedded through the model's
  gene embedding table, by its column index, so a measured gene the model never saw perturbed
  still has an embedding (it was trained as an expression token): unseen singles and unseen
  combinations of measured genes can be predicted.
- An *unmeasured* gene (perturbed in the cells, but not among the kept genes, as in public files
  that keep only a few hundred highly variable genes) has no expression token, so it gets a row
  of its own in a small learned table. That row learns only from cells perturbing the gene, so an
  unmeasured gene must be perturbed in training; one that is not ("unseen and unmeasured") is
  rejected with :class:`UnembeddablePerturbationError` before any training.

Ids: measured genes ``0..G-1`` (their column index), padding ``G``, unmeasured genes
``G+1..G+U``. Models saved before unmeasured genes existed have ``U = 0`` and the same ids.

*Drugs* have no gene to borrow from and get a learned table of their own (unseen drugs cannot be
predicted and raise an error).

Every cell carries two slots ``(B, 2)``; a single perturbation fills the second slot with the
padding id, and the embedding is the mean of the two slots, so ``A+B`` and ``B+A`` are the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ccfm import COMBO_SEPARATOR
from ccfm.data.conditions import CONTROL, parse_condition

SLOTS = 2
# Same scale as the gene embedding rows (CascadedFlowModel.initialize_weights): behind a
# LayerNorm, a row's learning speed under Adam depends on its norm, so the unmeasured rows
# should start as small as the measured ones or they would learn ~50x slower.
UNMEASURED_INIT_STD = 0.02


class UnembeddablePerturbationError(ValueError):
    """A gene is neither measured nor perturbed in training: the model cannot embed it."""


def split_label(label: str, separator: str = COMBO_SEPARATOR) -> list[str]:
    """Canonical label ``A`` or ``A+B`` -> its parts (at most two)."""
    parts = [part for part in label.split(separator) if part]
    if not parts or len(parts) > SLOTS:
        raise ValueError(f"perturbation label {label!r} must name 1 or {SLOTS} perturbations joined by {separator!r}")
    return parts


def label_genes(labels: Iterable[str]) -> list[str]:
    """Distinct perturbed names of ``labels`` (canonical labels or ``predict:`` entries), in order.

    Parsed like ``predict:`` entries are canonicalised for prediction, so ``B+A`` and ``A+ctrl``
    name the same genes as ``A+B`` and ``A``; controls name none.
    """
    names: dict[str, None] = {}
    for label in labels:
        for name in parse_condition(str(label), control_label=CONTROL).perturbations:
            names.setdefault(name, None)
    return list(names)


def unseen_unmeasured(
    measured: Iterable[str], train_labels: Iterable[str], labels: Iterable[str]
) -> dict[str, list[str]]:
    """Genes of ``labels`` that are not ``measured`` and perturbed in no training label.

    Returns ``{gene: [labels naming it]}`` (empty when every gene can be embedded).
    """
    known = set(map(str, measured)) | set(label_genes(train_labels))
    found: dict[str, list[str]] = {}
    for label in labels:
        for name in label_genes([label]):
            if name not in known:
                found.setdefault(name, []).append(str(label))
    return found


def unembeddable_message(found: dict[str, list[str]], where: str) -> str:
    """The error text for :func:`unseen_unmeasured` findings: which genes, why, and the fix."""
    listed = "; ".join(
        f"{gene!r} (in {', '.join(repr(label) for label in labels[:3])})" for gene, labels in found.items()
    )
    return (
        f"{where}: {len(found)} perturbed gene(s) are neither measured nor perturbed in training: {listed}. "
        f"Such a gene has no expression column (no gene-token embedding) and no training cell to learn a "
        f"perturbation embedding from, so its effect cannot be predicted. Fix: remove these entries from the "
        f"dataset's 'predict:' list in config/config.yaml, or use a file that keeps the gene in var (or has "
        f"cells perturbing it). A prior for such genes (pretrained scGPT gene embeddings) is not used for "
        f"perturbations by this pipeline."
    )


@dataclass
class PerturbationVocab:
    """Maps perturbation labels to the (2,) id pairs the model embeds.

    ``kind == "gene"``: ``genes`` is the expression panel (the model's gene list, in column
    order) and ``unmeasured`` the perturbed genes outside it. Ids: ``genes`` index, padding
    ``len(genes)``, then ``unmeasured`` from ``len(genes) + 1``.
    ``kind == "drug"``: ids are indices into ``drugs``; the padding id is ``len(drugs)``.
    """

    kind: str
    genes: list[str]
    drugs: list[str]
    separator: str = COMBO_SEPARATOR
    unmeasured: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("gene", "drug"):
            raise ValueError(f"perturbation_type {self.kind!r} is unknown: use 'gene' or 'drug'")
        if self.kind == "drug" and self.unmeasured:
            raise ValueError("a drug vocabulary has no unmeasured genes; drugs get their own table")
        overlap = sorted(set(self.genes) & set(self.unmeasured))
        if overlap:
            raise ValueError(f"genes listed both as measured and unmeasured: {overlap[:10]}")
        if self.kind == "gene":
            self._index = {name: i for i, name in enumerate(self.genes)}
            offset = len(self.genes) + 1  # after the padding id
            self._index.update({name: offset + j for j, name in enumerate(self.unmeasured)})
        else:
            self._index = {name: i for i, name in enumerate(self.drugs)}

    @classmethod
    def for_genes(
        cls,
        genes: Sequence[str],
        train_labels: Iterable[str] = (),
        other_labels: Iterable[str] = (),
        separator: str = COMBO_SEPARATOR,
        where: str = "perturbation vocabulary",
    ) -> PerturbationVocab:
        """Gene vocabulary over the panel ``genes`` plus every unmeasured gene of the labels.

        ``train_labels`` are the conditions the model learns from; ``other_labels`` the ones it
        only predicts (held-out, ``predict:``). An unmeasured gene of ``other_labels`` that no
        training label perturbs raises :class:`UnembeddablePerturbationError` (``where`` names
        the inputs in the message): its row would stay at its random initialisation.
        """
        train_labels, other_labels = list(train_labels), list(other_labels)
        found = unseen_unmeasured(genes, train_labels, other_labels)
        if found:
            raise UnembeddablePerturbationError(unembeddable_message(found, where))
        measured = set(genes)
        unmeasured = sorted(name for name in label_genes([*train_labels, *other_labels]) if name not in measured)
        return cls("gene", list(genes), [], separator, unmeasured)

    @classmethod
    def for_drugs(
        cls, genes: Sequence[str], labels: Iterable[str], separator: str = COMBO_SEPARATOR
    ) -> PerturbationVocab:
        """Drug table from every drug named in ``labels`` (training and prediction labels)."""
        drugs = sorted({part for label in labels for part in split_label(label, separator)})
        return cls("drug", list(genes), drugs, separator)

    @property
    def padding_id(self) -> int:
        return len(self.genes) if self.kind == "gene" else len(self.drugs)

    @property
    def n_drugs(self) -> int:
        return len(self.drugs)

    @property
    def n_unmeasured(self) -> int:
        return len(self.unmeasured)

    def is_measured(self, gene: str) -> bool:
        """Whether a gene perturbation shares the gene's expression-token embedding row."""
        return self.kind == "gene" and gene in self._index and self._index[gene] < self.padding_id

    def ids(self, label: str) -> list[int]:
        """``"A+B"`` -> ``[id(A), id(B)]``; ``"A"`` -> ``[id(A), padding]``."""
        parts = split_label(label, self.separator)
        missing = [part for part in parts if part not in self._index]
        if missing:
            if self.kind == "gene":
                raise KeyError(
                    f"perturbation {label!r}: {missing} not among the model's perturbation vocabulary "
                    f"({len(self.genes)} measured genes of results/<ds>/processed.h5ad and {len(self.unmeasured)} "
                    f"unmeasured perturbed genes named when the model was trained). Fix: list the entry in the "
                    f"dataset's 'predict:' before training (so the model is retrained with it), or correct it."
                )
            raise KeyError(
                f"perturbation {label!r}: {missing} not among the drugs the model was trained with "
                f"({len(self._index)} known); fix the dataset's 'predict:' list or the preprocessing."
            )
        ids = [self._index[part] for part in parts]
        return ids + [self.padding_id] * (SLOTS - len(ids))

    def batch_ids(self, labels: Sequence[str]) -> Tensor:
        """(B, 2) long tensor for a list of labels."""
        return torch.tensor([self.ids(label) for label in labels], dtype=torch.long)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "genes": list(self.genes),
            "drugs": list(self.drugs),
            "separator": self.separator,
            "unmeasured": list(self.unmeasured),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PerturbationVocab:
        # "unmeasured" is optional: a vocabulary without unmeasured genes may omit it.
        return cls(
            str(data["kind"]),
            list(data["genes"]),
            list(data["drugs"]),
            str(data["separator"]),  # type: ignore[arg-type]
            list(data.get("unmeasured", [])),  # type: ignore[arg-type]
        )


class PerturbationEncoder(nn.Module):
    """(B, 2) perturbation ids -> (B, d): embed both slots, average (order-invariant).

    Gene kind: ids up to the padding id go through the shared ``gene_encoder``; larger ids
    (``n_unmeasured`` of them) index ``unmeasured_table``, behind a LayerNorm of its own like
    the gene encoder's, so both kinds of rows have the same scale.
    """

    def __init__(self, gene_encoder: nn.Module, kind: str, n_drugs: int, d_model: int, n_unmeasured: int = 0) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gene":
            # Shared, not copied: perturbing gene g uses gene g's expression-token embedding.
            self.gene_encoder = gene_encoder
            self.padding_id = int(gene_encoder.padding_id)
            if n_unmeasured < 0:
                raise ValueError(f"n_unmeasured must be >= 0, got {n_unmeasured}")
            self.n_unmeasured = n_unmeasured
            if n_unmeasured:
                # No table at all without unmeasured genes: older model files load unchanged.
                self.unmeasured_table = nn.Embedding(n_unmeasured, d_model)
                nn.init.normal_(self.unmeasured_table.weight, std=UNMEASURED_INIT_STD)
                self.unmeasured_norm = nn.LayerNorm(d_model)
        elif kind == "drug":
            if n_unmeasured:
                raise ValueError("a drug model has no unmeasured genes")
            if n_drugs < 1:
                raise ValueError("a drug model needs at least one drug in its vocabulary")
            self.drug_table = nn.Embedding(n_drugs + 1, d_model)  # row n_drugs = padding
            self.drug_norm = nn.LayerNorm(d_model)
        else:
            raise ValueError(f"perturbation_type {kind!r} is unknown: use 'gene' or 'drug'")

    def _gene_slots(self, pert_ids: Tensor) -> Tensor:
        if not self.n_unmeasured:
            return self.gene_encoder(pert_ids)
        unmeasured = pert_ids > self.padding_id
        # Both lookups always run (clamped ids), so every parameter is in the graph of every
        # batch, as DistributedDataParallel requires; torch.where picks each slot's row.
        measured_rows = self.gene_encoder(pert_ids.clamp(max=self.padding_id))
        own_rows = self.unmeasured_norm(self.unmeasured_table((pert_ids - self.padding_id - 1).clamp(min=0)))
        return torch.where(unmeasured.unsqueeze(-1), own_rows, measured_rows)

    def forward(self, pert_ids: Tensor) -> Tensor:
        if pert_ids.dim() != 2 or pert_ids.shape[1] != SLOTS:
            raise ValueError(f"pert_ids must have shape (B, {SLOTS}), got {tuple(pert_ids.shape)}")
        if self.kind == "gene":
            slots = self._gene_slots(pert_ids)
        else:
            slots = self.drug_norm(self.drug_table(pert_ids))
        return slots.mean(dim=1)
