"""Input validation: fail early, at the first rule that reads a file, with an actionable message.

Every check raises a subclass of :class:`InputValidationError` whose message names the file,
the problem and the fix, so a user running the pipeline for days on a cluster learns what is
wrong in the first minutes and how to repair the input or the config. The checks are cheap:
metadata checks read ``obs``/``var`` only, value checks run on the row chunks the streaming
passes read anyway (:func:`check_chunk_values`), never on a whole matrix.

One module per concern: :mod:`~ccfm.data.validation.errors` (the error classes),
:mod:`~ccfm.data.validation.files` (the file and its values), :mod:`~ccfm.data.validation.labels`
(``obs``: labels and controls), :mod:`~ccfm.data.validation.genes` (``var``: gene names, target
overlap), :mod:`~ccfm.data.validation.predict` (``predict:`` entries) and
:mod:`~ccfm.data.validation.folds` (batch size, cell-eval profile of a fold). Everything is
importable from this package. Used by the preprocessing (rules ``preprocess`` and
``preprocess_target``), the split, training and scoring.
"""

from ccfm.data.validation.errors import (
    PREVIEW_ITEMS,
    BatchSizeError,
    ComboSeparatorError,
    ControlLabelMismatchError,
    DuplicateCellsError,
    DuplicateGenesError,
    EmptyInputError,
    EnsemblIdsError,
    InputValidationError,
    InvalidValuesError,
    LabelParseError,
    MissingColumnError,
    MissingLabelError,
    NoControlCellsError,
    NotGeneSymbolsError,
    TargetGenesError,
    UnknownPerturbationError,
    UnreadableInputError,
    UnsupportedDtypeError,
    preview,
)
from ccfm.data.validation.files import (
    check_chunk_values,
    check_matrix_dtypes,
    check_not_empty,
    check_readable_h5ad,
)
from ccfm.data.validation.folds import (
    CELL_EVAL_PROFILES,
    FALLBACK_PROFILE,
    FEW_CELLS,
    MIN_PERTURBATIONS,
    TooFewPerturbationsError,
    check_batch_size,
    check_enough_perturbations,
    few_cell_perturbations,
    scoring_profile,
)
from ccfm.data.validation.genes import (
    ENSEMBL_COLUMNS,
    ENSEMBL_PATTERN,
    SYMBOL_COLUMNS,
    check_gene_names,
    check_target_gene_overlap,
    is_ensembl_id,
    symbol_column,
)
from ccfm.data.validation.labels import (
    SEPARATOR_CANDIDATES,
    check_cell_names,
    check_combo_separator,
    check_controls,
    check_gene_labels,
    check_labels_present,
    check_perturbation_column,
    doubles_missing_singles,
    joined_gene_names,
    near_control_labels,
    warn_doubles_missing_singles,
)
from ccfm.data.validation.predict import (
    predict_entry_genes,
    validate_drug_predict_entries,
    validate_predict_entries,
)

__all__ = [
    "BatchSizeError",
    "CELL_EVAL_PROFILES",
    "ComboSeparatorError",
    "ControlLabelMismatchError",
    "DuplicateCellsError",
    "DuplicateGenesError",
    "ENSEMBL_COLUMNS",
    "ENSEMBL_PATTERN",
    "EmptyInputError",
    "EnsemblIdsError",
    "FALLBACK_PROFILE",
    "FEW_CELLS",
    "InputValidationError",
    "InvalidValuesError",
    "LabelParseError",
    "MIN_PERTURBATIONS",
    "MissingColumnError",
    "MissingLabelError",
    "NoControlCellsError",
    "NotGeneSymbolsError",
    "PREVIEW_ITEMS",
    "SEPARATOR_CANDIDATES",
    "SYMBOL_COLUMNS",
    "TargetGenesError",
    "TooFewPerturbationsError",
    "UnknownPerturbationError",
    "UnreadableInputError",
    "UnsupportedDtypeError",
    "check_batch_size",
    "check_cell_names",
    "check_chunk_values",
    "check_combo_separator",
    "check_controls",
    "check_enough_perturbations",
    "check_gene_labels",
    "check_gene_names",
    "check_labels_present",
    "check_matrix_dtypes",
    "check_not_empty",
    "check_perturbation_column",
    "check_readable_h5ad",
    "check_target_gene_overlap",
    "doubles_missing_singles",
    "few_cell_perturbations",
    "is_ensembl_id",
    "joined_gene_names",
    "near_control_labels",
    "predict_entry_genes",
    "preview",
    "scoring_profile",
    "symbol_column",
    "validate_drug_predict_entries",
    "validate_predict_entries",
    "warn_doubles_missing_singles",
]
