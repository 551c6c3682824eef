"""Multi-process training: ``train.gpus`` > 1 starts that many torchrun workers (:mod:`ccfm.model.train_worker`)."""

from __future__ import annotations

import json
from pathlib import Path

from ccfm.distributed import launch
from ccfm.io.atomic import write_text_atomic
from ccfm.model.request import TrainRequest

# The request every worker reads, in the run's resume directory.
LAUNCH_REQUEST = "launch.json"


def train_distributed(
    n_processes: int, log_path: str | Path | None, request: TrainRequest, threads_per_process: int = 1
) -> None:
    """Run :func:`ccfm.model.training.train_from_files` in ``n_processes`` torchrun workers.

    The request travels as a JSON file in the resume directory (no pickle, no shell string), with
    the workers' thread count beside it; rank 0 writes the outputs as in a single-process run.
    """
    payload = {**json.loads(request.to_json()), "threads_per_process": int(threads_per_process)}
    request_json = Path(request.resume_dir) / LAUNCH_REQUEST
    write_text_atomic(request_json, json.dumps(payload, indent=2))
    launch(n_processes, request_json, log_path)
