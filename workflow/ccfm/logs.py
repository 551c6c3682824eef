"""Logging set-up shared by the rule scripts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ccfm.threads import limit_native_threads


def setup_rule_logging(log_path: str | Path | None, level: int = logging.INFO) -> logging.Logger:
    """Send the ``ccfm`` logger (and warnings) to ``log_path`` and to stderr.

    Rule scripts call this first so every message lands in the rule's ``log:`` file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        # Truncate, then append (O_APPEND): worker processes started by the rule (multi-GPU
        # training) write to the same file without overwriting each other.
        Path(log_path).write_text("")
        handlers.append(logging.FileHandler(log_path, mode="a"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return logging.getLogger("ccfm")


def setup_rule(log_path: str | Path | None, threads: int) -> logging.Logger:
    """The first call of every rule script: log to the rule's ``log:`` file, use its ``threads``.

    Caps every native thread pool at the rule's threads: the environment variables for libraries
    loaded later (cell-eval's numba and polars are imported inside the functions that use them),
    and torch's pool when torch is already loaded.
    """
    limit_native_threads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, int(threads)))
    return setup_rule_logging(log_path)
