"""Multi-process (DDP) training on CPU with gloo: shards, the torchrun launcher, same trajectory as 1 process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccfm.data.perturbations import PerturbationVocab
from ccfm.distributed import DistContext, shard_bounds, torchrun_command
from ccfm.model.checkpoint import load_model
from ccfm.model.expression import load_expression
from ccfm.model.training import (
    ResumePoint,
    Trainer,
    TrainingSet,
    TrainRequest,
    TrainSettings,
    build_denoiser,
    train_distributed,
    train_from_files,
)
from ccfm.scgpt.feature_cache import CACHE_FILES
from scgpt_test_data import SMALL_SCGPT_SIZES
from training_data import MODEL, FakeLatent, tiny_scgpt_inputs, write_dataset

TRAIN = {
    "steps": 24,
    "batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 4,
    "infer_top_gene": 12,
    "checkpoint_every": 8,
    "log_every": 4,
    "mmd": True,
    "gamma": 0.5,
}


def test_shard_bounds_split_the_global_batch_evenly() -> None:
    assert [shard_bounds(48, rank, 4) for rank in range(4)] == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert shard_bounds(16, 0, 1) == (0, 16)
    with pytest.raises(ValueError, match="batch_size=15 cannot be split evenly over 2"):
        shard_bounds(15, 1, 2)
    with pytest.raises(ValueError, match="outside a group"):
        shard_bounds(16, 2, 2)


def test_work_parts_cover_everything_once() -> None:
    parts = [DistContext(rank, 3).part(10) for rank in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]
    assert DistContext(1, 4).part(2) == (1, 2) and DistContext(3, 4).part(2) == (2, 2)


def test_torchrun_command_is_an_argv_without_shell() -> None:
    argv = torchrun_command(4, "/tmp/x y/launch.json")
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert argv[-3:] == ["-m", "ccfm.model.train_worker", "/tmp/x y/launch.json"]
    with pytest.raises(ValueError):
        torchrun_command(1, "x.json")


# -- two ranks in-process (spawned), Trainer level --------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer(processed: Path, split: Path, resume: Path, latent_dim: int, context: DistContext | None) -> Trainer:
    torch.set_num_threads(1)
    data = load_expression(processed)
    labels = json.loads(split.read_text())["train"]
    vocab = PerturbationVocab.for_genes(data.genes)
    denoiser = build_denoiser(data.n_genes, MODEL, TRAIN, latent_dim, vocab, seed=11)
    trainer = Trainer(
        denoiser,
        TrainingSet(data, labels, vocab, latent_targets=FakeLatent(latent_dim) if latent_dim else None),
        TrainSettings.from_train_section(TRAIN),
        ResumePoint(resume),
        seed=11,
        dist=context,
    )
    trainer.rows_seen = []
    return trainer


def _rank_main(rank: int, world: int, port: int, processed: Path, split: Path, out: Path, latent_dim: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = _trainer(processed, split, out / "resume", latent_dim, DistContext(rank, world, rank))
        result = trainer.run(progress=False)
        torch.save(
            {
                "rows": [torch.from_numpy(r) for r in trainer.rows_seen],
                "history": torch.tensor(result.history),
                "params": trainer.denoiser.model.state_dict(),
            },
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # subprocess
@pytest.mark.parametrize("latent_dim", [0, 4])
def test_two_ranks_see_disjoint_halves_and_follow_the_single_process(tmp_path, latent_dim) -> None:
    processed, split = write_dataset(tmp_path)
    single = _trainer(processed, split, tmp_path / "single", latent_dim, None)
    single_history = np.asarray(single.run(progress=False).history)

    mp.spawn(_rank_main, args=(2, _free_port(), processed, split, tmp_path, latent_dim), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]["rows"]) == len(single.rows_seen) == TRAIN["steps"]
    for step, whole in enumerate(single.rows_seen):
        first, second = (ranks[r]["rows"][step].numpy() for r in range(2))
        # each rank trains on its own half of the very batch the single process drew
        assert first.size == second.size == TRAIN["batch_size"] // 2
        np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    # same global batch, same noise: the loss log (global values on every rank) matches
    for r in range(2):
        np.testing.assert_allclose(ranks[r]["history"].numpy(), single_history, rtol=1e-4, atol=1e-6)
    if latent_dim:
        assert single_history[:, 3].max() > 0
    for name, value in single.denoiser.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name  # ranks stay in sync


# -- the launcher (torchrun) with the rule's entry point ---------------------------------------


def _files_kwargs(out: Path) -> dict[str, Path]:
    return {"out_model": out / "model.pt", "out_loss": out / "loss.tsv", "resume_dir": out / "resume"}


def test_launch_request_reaches_the_workers_whole(tmp_path, monkeypatch) -> None:
    # train_distributed writes the request the torchrun workers read: every field survives JSON
    # (paths as strings) and the worker's TrainRequest(**fields) rebuilds the same request.
    from ccfm.model import launch

    started: list[tuple] = []
    monkeypatch.setattr(launch, "launch", lambda *args: started.append(args))
    request = TrainRequest(
        **_files_kwargs(tmp_path),
        processed_h5ad=tmp_path / "processed.h5ad",
        split_json=tmp_path / "split.json",
        model_section=MODEL,
        train_section={**TRAIN, "gpus": 2},
        latent_section={"cache": "on"},
        seed=11,
        use_latent=True,
        scgpt_dir=tmp_path / "scgpt",
        gene_vocab_tsv=tmp_path / "gene_vocab.tsv",
        latent_stats=tmp_path / "latent_stats.pt",
        perturbation_type="drug",
        extra_labels=["A+B"],
    )
    train_distributed(2, tmp_path / "train.log", request, threads_per_process=3)
    request_json = tmp_path / "resume" / "launch.json"
    assert started == [(2, request_json, tmp_path / "train.log")]
    fields = json.loads(request_json.read_text())
    assert fields.pop("threads_per_process") == 3
    rebuilt = TrainRequest(**fields)
    for name, value in vars(request).items():
        got = getattr(rebuilt, name)
        assert got == (str(value) if isinstance(value, Path) else value), name


@pytest.mark.slow  # subprocess
def test_torchrun_two_processes_match_one_process(tmp_path) -> None:
    # The workers run one thread each; so must the reference run, or float summation order
    # differs and Adam amplifies the difference on near-zero gradients (zero-initialised heads).
    torch.set_num_threads(1)
    processed, split = write_dataset(tmp_path)
    common = dict(
        processed_h5ad=processed,
        split_json=split,
        model_section=MODEL,
        train_section={**TRAIN, "gpus": 2},
        latent_section={},
        seed=5,
        use_latent=False,
    )
    train_from_files(
        TrainRequest(
            **_files_kwargs(tmp_path / "one"),
            **common,
        ),
        device="cpu",
        progress=False,
    )
    log_path = tmp_path / "train.log"
    log_path.write_text("")
    train_distributed(
        2,
        log_path,
        TrainRequest(
            **_files_kwargs(tmp_path / "two"),
            **common,
        ),
    )

    one = pd.read_csv(tmp_path / "one" / "loss.tsv", sep="\t")
    two = pd.read_csv(tmp_path / "two" / "loss.tsv", sep="\t")
    assert two["step"].tolist() == list(range(4, 25, 4))
    np.testing.assert_allclose(two.to_numpy(), one.to_numpy(), rtol=1e-4, atol=1e-6)
    a, b = load_model(tmp_path / "one" / "model.pt"), load_model(tmp_path / "two" / "model.pt")
    for name, value in a.denoiser.model.state_dict().items():
        torch.testing.assert_close(b.denoiser.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    text = log_path.read_text()
    assert "distributed training: 2 processes, backend gloo" in text and "[rank 0]" in text
    # the request file travels as JSON; the finished run's checkpoint is gone (a rerun starts at 0)
    request = json.loads((tmp_path / "two" / "resume" / "launch.json").read_text())
    assert request["train_section"]["gpus"] == 2 and request["seed"] == 5
    assert sorted(p.name for p in (tmp_path / "two" / "resume").iterdir()) == ["launch.json"]


@pytest.mark.slow  # subprocess
def test_torchrun_failure_names_the_log(tmp_path) -> None:
    processed, split = write_dataset(tmp_path)
    log_path = tmp_path / "train.log"
    log_path.write_text("")
    with pytest.raises(RuntimeError, match=r"distributed training failed .*train\.log"):
        train_distributed(
            2,
            log_path,
            TrainRequest(
                **_files_kwargs(tmp_path / "bad"),
                processed_h5ad=processed,
                split_json=split,
                model_section=MODEL,
                train_section={**TRAIN, "batch_size": 15},
                latent_section={},
                seed=5,
                use_latent=False,
            ),
        )
    assert "batch_size=15 cannot be split evenly over 2 processes" in log_path.read_text()
    assert not (tmp_path / "bad" / "model.pt").exists() and not (tmp_path / "bad" / "loss.tsv").exists()


@pytest.mark.slow  # subprocess
def test_torchrun_with_scgpt_latent_builds_one_shared_feature_cache(tmp_path, tiny_scgpt_checkpoint) -> None:
    inputs = tiny_scgpt_inputs(tmp_path, tiny_scgpt_checkpoint(seed=0, **SMALL_SCGPT_SIZES))
    latent = {"cache": "on", "cache_max_gb": 1, "max_tokens_per_cell": 1200}
    train = {**TRAIN, "steps": 8, "batch_size": 8, "checkpoint_every": 4}
    common = dict(
        processed_h5ad=inputs["processed_h5ad"],
        split_json=inputs["split_json"],
        model_section=MODEL,
        train_section=train,
        latent_section=latent,
        seed=5,
        use_latent=True,
        scgpt_dir=inputs["scgpt_dir"],
        gene_vocab_tsv=inputs["gene_vocab_tsv"],
        latent_stats=inputs["latent_stats"],
    )
    train_from_files(
        TrainRequest(
            **_files_kwargs(tmp_path / "one"),
            **common,
        ),
        device="cpu",
        progress=False,
    )
    log_path = tmp_path / "train.log"
    log_path.write_text("")
    train_distributed(
        2,
        log_path,
        TrainRequest(
            **_files_kwargs(tmp_path / "two"),
            **common,
        ),
    )

    # the cache built by two ranks, each extracting its own part, equals the single-process one
    for name in CACHE_FILES:
        one = np.load(tmp_path / "one" / "resume" / "feature_cache" / name)
        two = np.load(tmp_path / "two" / "resume" / "feature_cache" / name)
        np.testing.assert_array_equal(two, one, err_msg=name)
    assert (tmp_path / "two" / "resume" / "feature_cache" / "manifest.json").exists()
    one_loss = pd.read_csv(tmp_path / "one" / "loss.tsv", sep="\t")
    two_loss = pd.read_csv(tmp_path / "two" / "loss.tsv", sep="\t")
    assert (two_loss["latent"] > 0).all()
    np.testing.assert_allclose(two_loss.to_numpy(), one_loss.to_numpy(), rtol=1e-4, atol=1e-6)
