"""One training process of a multi-process run; started by torchrun via :func:`ccfm.distributed.launch`.

    python -m torch.distributed.run --standalone --nproc-per-node=N -m ccfm.model.train_worker request.json

``request.json`` holds the fields of a :class:`ccfm.model.request.TrainRequest` and the workers'
``threads_per_process`` (written by :func:`ccfm.model.launch.train_distributed`). Output (stdout/stderr)
goes to the rule's log; rank 0 logs progress, the other ranks only warnings and errors, each line tagged with its rank.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from ccfm import distributed
from ccfm.model.request import TrainRequest
from ccfm.model.training import train_from_files


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m ccfm.model.train_worker REQUEST_JSON (started by torchrun)")
    request = json.loads(Path(argv[0]).read_text())
    _setup_logging(int(os.environ.get("RANK", "0")))
    context = distributed.init_from_env()
    torch.set_num_threads(int(request.pop("threads_per_process", 1)))
    try:
        train_from_files(TrainRequest(**request), dist=context, progress=context.is_main)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
