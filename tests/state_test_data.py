"""A State run directory in the released layout, written with arc-state's own classes (needs the [state] extra).

Layout and writers as `state tx train` uses them and published checkpoints carry them: ``config.yaml``,
``var_dims.pkl`` (pickle), ``pert_onehot_map.pt`` (torch.save), the optional ``batch_onehot_map.pkl`` and
``cell_type_onehot_map.pkl`` (pickled dicts of one-hot tensors), ``data_module.torch`` (a pickled object, which
the loader must never read: this one writes ``marker`` if it is), and Lightning's own checkpoint of
``StateTransitionPerturbationModel``, here at the top level as ``final.ckpt``.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml


class WritesFile:
    """Unpickling this calls exec(), which creates ``path``: the side effect a safe loader must prevent."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def small_hparams(genes: Sequence[str], perts: Sequence[str], cell_set_len: int = 8) -> dict:
    """Constructor arguments of a tiny gene-space State transition model (llama backbone)."""
    n = len(genes)
    return dict(
        input_dim=n, hidden_dim=16, output_dim=n, pert_dim=len(perts), batch_dim=1, gene_dim=n, hvg_dim=0,
        embed_key=None, output_space="gene", gene_names=list(genes), control_pert="non-targeting",
        basal_mapping_strategy="random", cell_set_len=cell_set_len, n_encoder_layers=1, n_decoder_layers=1,
        predict_residual=True, distributional_loss="energy", loss="energy", blur=0.05, gene_decoder_bool=False,
        use_basal_projection=False, lr=1e-3, batch_size=2, loss_fn="mse", transformer_backbone_key="llama",
        transformer_backbone_kwargs=dict(
            bidirectional_attention=True, max_position_embeddings=cell_set_len, hidden_size=16,
            intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
            use_cache=False, attention_dropout=0.0, hidden_dropout=0.0, layer_norm_eps=1e-6, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rotary_dim=0, use_rotary_embeddings=False,
        ),
    )  # fmt: skip


def write_released_state_run(
    run: Path, genes: Sequence[str], perts: Sequence[str], marker: Path, seed: int = 0
) -> torch.nn.Module:
    """Write the run directory ``run`` (module docstring); returns the model whose weights it holds."""
    import lightning.pytorch as pl
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = StateTransitionPerturbationModel(**small_hparams(genes, perts))
    model.eval()
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(run / "final.ckpt")
    config = {
        "model": {"name": "state", "kwargs": {"cell_set_len": 8}},
        "data": {"kwargs": {"embed_key": None, "output_space": "gene", "control_pert": "non-targeting"}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    var_dims = {
        "input_dim": np.int64(len(genes)), "gene_dim": np.int64(len(genes)), "hvg_dim": 0,
        "output_dim": np.int64(len(genes)), "pert_dim": len(perts), "gene_names": list(genes), "batch_dim": 1,
        "pert_names": list(perts),
    }  # fmt: skip
    torch.save({name: torch.eye(len(perts))[i] for i, name in enumerate(perts)}, run / "pert_onehot_map.pt")
    with open(run / "var_dims.pkl", "wb") as handle:
        pickle.dump(var_dims, handle)
    with open(run / "batch_onehot_map.pkl", "wb") as handle:
        pickle.dump({"batch0": torch.ones(1)}, handle)
    with open(run / "cell_type_onehot_map.pkl", "wb") as handle:
        pickle.dump({"K562": torch.tensor([1.0, 0.0]), "HepG2": torch.tensor([0.0, 1.0])}, handle)
    (run / "data_module.torch").write_bytes(pickle.dumps(WritesFile(marker)))
    return model
