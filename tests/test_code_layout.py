"""Layout rules of the package (issue 23): every stage's subpackage is checked.

No function over 80 lines or with more than 8 parameters (long argument lists are settings
objects), and the settings objects that replaced them take their defaults from the schema.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ccfm.config import section_defaults

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "ccfm"
CHECKED = ("model", "evaluate", "scgpt", "io", "data", "adapt", "state")
MAX_LINES, MAX_PARAMETERS = 80, 8


def _functions(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg not in ("self", "cls")]
    return names + [f"*{a.arg}" for a in (args.vararg, args.kwarg) if a is not None]


@pytest.mark.parametrize("package", CHECKED)
def test_no_long_functions_or_argument_lists(package: str) -> None:
    too_big = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines, {len(_parameters(node))} parameters)"
        for path, node in _functions(PACKAGE / package)
        if node.end_lineno - node.lineno + 1 > MAX_LINES or len(_parameters(node)) > MAX_PARAMETERS
    ]
    assert not too_big, "split these, or pass a settings object:\n" + "\n".join(too_big)


def test_no_module_over_600_lines() -> None:
    long = [
        f"{p.relative_to(PACKAGE)} ({n} lines)"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert not long, "split these modules by job:\n" + "\n".join(long)


def test_the_checker_sees_a_long_argument_list(tmp_path: Path) -> None:
    (tmp_path / "wide.py").write_text("def wide(a, b, c, d, e, f, g, h, i):\n    return a\n")
    found = [(node.name, len(_parameters(node))) for _, node in _functions(tmp_path)]
    assert found == [("wide", 9)]


def test_settings_objects_take_the_schema_defaults() -> None:
    from ccfm.evaluate.baselines import BaselineOptions
    from ccfm.evaluate.celleval import ScoreOptions
    from ccfm.model.denoiser import Integration
    from ccfm.scgpt.extractor import ExtractorSettings

    score, generate, latent = section_defaults("score"), section_defaults("generate"), section_defaults("latent")
    assert (ScoreOptions().cell_eval_profile, ScoreOptions().top_de) == (score["profile"], score["top_de"])
    assert BaselineOptions().cells_per_perturbation == generate["cells_per_perturbation"]
    assert Integration() == Integration(generate["latent_steps"], generate["expr_steps"], generate["method"])
    extractor = ExtractorSettings()
    assert (extractor.zero_tokens, extractor.max_tokens_per_cell, extractor.batching) == (
        latent["zero_tokens"],
        latent["max_tokens_per_cell"],
        latent["batching"],
    )
