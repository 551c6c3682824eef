"""The errors input validation raises (each message names the file, the problem and the fix), and the
short list preview those messages share."""

from __future__ import annotations

from collections.abc import Sequence

PREVIEW_ITEMS = 10


class InputValidationError(ValueError):
    """An input file or a config entry is unusable; the message names file, problem and fix."""


class MissingColumnError(InputValidationError, KeyError):
    """The configured perturbation column is not in ``obs``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingLabelError(InputValidationError):
    """Some cells have no perturbation label."""


class NoControlCellsError(InputValidationError):
    """No cell carries the control label (and no near match was found)."""


class ControlLabelMismatchError(NoControlCellsError):
    """No cell carries the configured control label, but a similar label exists."""


class InvalidValuesError(InputValidationError):
    """The expression matrix holds negative, NaN or infinite values."""


class DuplicateGenesError(InputValidationError):
    """``var_names`` contains duplicated gene names."""


class EnsemblIdsError(InputValidationError):
    """``var_names`` are Ensembl ids where gene symbols are needed."""


class UnknownPerturbationError(InputValidationError):
    """A ``predict:`` entry names a gene absent from the data (or from the scGPT vocabulary)."""


class UnreadableInputError(InputValidationError):
    """The input file is missing, empty, truncated or not an HDF5/h5ad file."""


class EmptyInputError(InputValidationError):
    """The h5ad file is well-formed but holds no cells (or no genes)."""


class UnsupportedDtypeError(InputValidationError):
    """The expression matrix is stored in a dtype the streaming readers cannot use (float16, strings)."""


class DuplicateCellsError(InputValidationError):
    """``obs_names`` contains duplicated cell names."""


class NotGeneSymbolsError(InputValidationError):
    """The perturbation column of a gene dataset holds numbers, not gene symbols."""


class LabelParseError(InputValidationError):
    """A perturbation label cannot be parsed (more than two perturbations, a stray guide index)."""


class TargetGenesError(InputValidationError):
    """The target context shares too few genes with the source dataset for adaptation to mean anything."""


class ComboSeparatorError(LabelParseError):
    """Doubles written with another separator than ``combo_separator`` were read as single genes."""


class BatchSizeError(InputValidationError):
    """``train.batch_size`` is beyond the cells a training batch can draw without repeating them all."""


def preview(items: Sequence[str], n: int = PREVIEW_ITEMS) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
