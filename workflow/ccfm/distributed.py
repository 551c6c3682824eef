"""Multi-process data-parallel training: process group, batch shards, collectives, launcher.

``train.gpus: N`` (N > 1) trains with N processes started by ``torchrun`` (torch's own launcher,
``python -m torch.distributed.run --standalone``) around :mod:`ccfm.model.train_worker`; the model is
wrapped in :class:`torch.nn.parallel.DistributedDataParallel`. The scheme keeps the result
independent of the number of processes:

- every process draws the *same* global batch (same seeded sampler) and the same flow-matching
  noise for it, then works on its own contiguous slice of the cells (:func:`shard_bounds`);
- losses are scaled so the gradients summed over processes equal the single-process gradient of
  the global batch (batch-level terms such as the MMD see all processes' cells through
  :func:`gather_rows`), so N processes follow the 1-process loss trajectory;
- rank 0 alone writes checkpoints, the model and the loss log; every rank can resume from them
  because all random state is global.

Backend: NCCL with one GPU per process when enough GPUs are visible, otherwise gloo on CPU (the
fallback that lets the logic be tested without a GPU).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

# Generous: rank 0 alone loads data or writes checkpoints while the others wait at a barrier.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def pick_device(gpus: int | None = None) -> torch.device:
    """CUDA when a GPU is visible (and ``gpus`` > 0 when given), otherwise CPU; logged either way."""
    use_cuda = torch.cuda.is_available() and (gpus is None or gpus > 0)
    device = torch.device("cuda" if use_cuda else "cpu")
    log.info("device: %s", device)
    return device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the group (``world_size == 1``: no group, plain training)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, total: int) -> slice:
        start, stop = shard_bounds(total, self.rank, self.world_size)
        return slice(start, stop)

    def part(self, total: int) -> tuple[int, int]:
        """Contiguous ``[start, stop)`` of ``total`` work items for this rank (sizes differ by ≤ 1)."""
        per_rank, extra = divmod(total, self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return start, start + per_rank + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``total`` rows owned by ``rank``; every rank gets the same count."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size} processes")
    if total % world_size:
        raise ValueError(
            f"train.batch_size={total} cannot be split evenly over {world_size} processes (train.gpus); "
            f"use a batch size divisible by {world_size}"
        )
    per_rank = total // world_size
    return rank * per_rank, (rank + 1) * per_rank


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the gradient of its own rows.

    Every process computes the same loss on the gathered tensor; the gradient of the global loss
    with respect to a process's rows is the sum of what all processes computed for them.
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rows, ctx.rank = local.shape[0], rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every process's ``local`` rows in rank order (identity without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherRows.apply(local)


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of small per-rank numbers (loss shares for logging)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    buffer = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


# --------------------------------------------------------------------------------------------
# Inside a torchrun worker
# --------------------------------------------------------------------------------------------


def init_from_env() -> DistContext:
    """Join the group torchrun set up (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); one GPU per process."""
    try:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except KeyError as missing:
        raise RuntimeError(f"{missing} is not set: multi-process training must be started by torchrun") from None
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    if rank == 0:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        log.info("distributed training: %d processes, backend %s, %d GPU(s) visible", world, backend, visible)
        if not use_cuda:
            log.warning("fewer GPUs visible (%d) than processes (%d): training on CPU with gloo", visible, world)
    return DistContext(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# In the rule's process
# --------------------------------------------------------------------------------------------


def torchrun_command(n_processes: int, request_json: str | Path) -> list[str]:
    """argv (no shell) starting ``n_processes`` training workers on this node."""
    if n_processes < 2:
        raise ValueError(f"torchrun is for 2 or more processes, got {n_processes}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={int(n_processes)}",
        "-m",
        "ccfm.model.train_worker",
        str(request_json),
    ]


def launch(n_processes: int, request_json: str | Path, log_path: str | Path | None = None) -> None:
    """Run the workers to completion; their output goes to ``log_path`` (or this process's stderr).

    Raises:
        RuntimeError: a worker failed (torchrun stops the others); the log has its traceback.
    """
    command = torchrun_command(n_processes, request_json)
    log.info("starting %d training processes: %s", n_processes, " ".join(command))
    env = dict(os.environ)
    # Workers import ccfm from wherever this process did (an editable install or PYTHONPATH).
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    if log_path is None:
        completed = subprocess.run(command, env=env, check=False)
    else:
        with open(log_path, "a") as sink:
            completed = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        where = f"; see {log_path}" if log_path else ""
        raise RuntimeError(f"distributed training failed (torchrun exit code {completed.returncode}){where}")
