"""CascadedFlowModel: shapes of both variants, perturbation embedding, initialisation."""

from __future__ import annotations

import pytest
import torch

from ccfm.data.perturbations import PerturbationVocab
from ccfm.model.model import CascadedFlowModel, DifferentialAttention, ModelConfig, lambda_init_for_depth

N_GENES, B, G, D = 40, 3, 12, 16


def _model(latent_dim: int = D, fusion: str = "differential_perceiver", **kw) -> CascadedFlowModel:
    torch.manual_seed(0)
    return CascadedFlowModel(
        ModelConfig(
            n_genes=N_GENES,
            d_model=32,
            nhead=4,
            nlayers=2,
            latent_dim=latent_dim,
            bottleneck=8,
            dh_depth=1,
            fusion=fusion,
            **kw,
        )
    )


def _inputs(latent: bool = True):
    g = torch.Generator().manual_seed(1)
    gene_ids = torch.randint(0, N_GENES, (B, G), generator=g)
    cell_1 = torch.rand(B, G, generator=g) * 3
    x_t = torch.randn(B, G, generator=g)
    z_t = torch.randn(B, G, D, generator=g) if latent else None
    t = torch.rand(B, generator=g)
    pert = torch.tensor([[1, 2], [3, N_GENES], [5, 6]])
    return gene_ids, cell_1, x_t, z_t, t, t.flip(0), pert


@pytest.mark.parametrize("fusion", ["differential_perceiver", "perceiver"])
def test_forward_shapes_with_latent(fusion: str) -> None:
    model = _model(fusion=fusion)
    v_expr, v_latent = model(*_inputs())
    assert v_expr.shape == (B, G)
    assert v_latent is not None and v_latent.shape == (B, G, D)
    assert torch.isfinite(v_expr).all() and torch.isfinite(v_latent).all()


@pytest.mark.parametrize("fusion", ["differential_perceiver", "perceiver"])
def test_forward_shapes_without_latent(fusion: str) -> None:
    model = _model(latent_dim=0, fusion=fusion)
    gene_ids, cell_1, x_t, _, t, _, pert = _inputs(latent=False)
    v_expr, v_latent = model(gene_ids, cell_1, x_t, None, t, None, pert)
    assert v_expr.shape == (B, G) and v_latent is None
    assert not hasattr(model, "latent_embedder") and not hasattr(model, "latent_decoder")
    # The ablation is strictly smaller: no latent embedder, time embedder or head.
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _model(fusion=fusion).parameters())


def test_latent_model_requires_latent_inputs() -> None:
    gene_ids, cell_1, x_t, _, t, _, pert = _inputs()
    with pytest.raises(ValueError, match="latent stream"):
        _model()(gene_ids, cell_1, x_t, None, t, None, pert)


def test_latent_head_is_zero_initialised_and_trainable() -> None:
    model = _model()
    _, v_latent = model(*_inputs())
    assert torch.count_nonzero(v_latent) == 0
    v_latent.sum().backward()  # zero output but non-zero gradient into the final layer
    assert model.latent_decoder.final.linear.weight.grad.abs().sum() > 0


def test_double_perturbation_is_order_invariant() -> None:
    model = _model().eval()
    gene_ids, cell_1, x_t, z_t, t, t2, _ = _inputs()
    ab = torch.tensor([[1, 7]] * B)
    ba = torch.tensor([[7, 1]] * B)
    out_ab = model(gene_ids, cell_1, x_t, z_t, t, t2, ab)
    out_ba = model(gene_ids, cell_1, x_t, z_t, t, t2, ba)
    torch.testing.assert_close(out_ab[0], out_ba[0])
    torch.testing.assert_close(out_ab[1], out_ba[1])
    # ...and the perturbation matters: another pair gives another output.
    out_other = model(gene_ids, cell_1, x_t, z_t, t, t2, torch.tensor([[1, 8]] * B))
    assert not torch.allclose(out_ab[0], out_other[0])


def test_gene_perturbation_shares_gene_embedding() -> None:
    model = _model()
    ids = torch.tensor([[4, 9]])
    expected = model.gene_encoder(ids).mean(dim=1)
    torch.testing.assert_close(model.perturbation_encoder(ids), expected)


def test_drug_model_uses_own_table() -> None:
    model = _model(perturbation_type="drug", n_drugs=3).eval()
    gene_ids, cell_1, x_t, z_t, t, t2, _ = _inputs()
    v_expr, _ = model(gene_ids, cell_1, x_t, z_t, t, t2, torch.tensor([[0, 3], [1, 2], [2, 1]]))
    assert v_expr.shape == (B, G)
    encoder = model.perturbation_encoder
    assert encoder.drug_table.num_embeddings == 4
    # The embedding is the drug table's (normalised) rows, averaged over the two slots (3 = padding).
    ids = torch.tensor([[0, 3], [1, 2], [2, 1]])
    expected = encoder.drug_norm(encoder.drug_table(ids)).mean(dim=1)
    torch.testing.assert_close(encoder(ids), expected)
    assert not torch.allclose(encoder(ids), model.gene_encoder(ids).mean(dim=1))  # not the gene embedding
    # Different drugs give different predictions; the order of a combination does not matter.
    outputs = {
        name: model(gene_ids, cell_1, x_t, z_t, t, t2, torch.tensor([pair] * B))[0]
        for name, pair in {"a": [0, 3], "b": [1, 3], "ab": [0, 1], "ba": [1, 0]}.items()
    }
    assert not torch.allclose(outputs["a"], outputs["b"])
    assert not torch.allclose(outputs["a"], outputs["ab"]) and not torch.allclose(outputs["b"], outputs["ab"])
    torch.testing.assert_close(outputs["ab"], outputs["ba"])


def test_vocab_ids_pad_and_errors() -> None:
    vocab = PerturbationVocab.for_genes(["A", "B", "C"])
    assert vocab.ids("B") == [1, 3]
    assert vocab.ids("A+C") == [0, 2]
    with pytest.raises(KeyError, match="not among"):
        vocab.ids("A+ZZZ")
    drugs = PerturbationVocab.for_drugs(["g1"], ["x+y", "z"])
    assert drugs.drugs == ["x", "y", "z"] and drugs.ids("z+x") == [2, 0]
    assert PerturbationVocab.from_dict(drugs.to_dict()).ids("y") == [1, 3]


def test_encode_control_is_per_cell_and_differentiable() -> None:
    model = _model()
    gene_ids, cell_1, *_ = _inputs()
    cell_1 = cell_1.clone().requires_grad_(True)
    enc = model.encode_control(gene_ids, cell_1)
    assert enc.shape == (B, 32)
    enc.sum().backward()
    assert cell_1.grad is not None and cell_1.grad.abs().sum() > 0
    # Encoding one cell does not depend on the other cells of the batch.
    torch.testing.assert_close(model.encode_control(gene_ids[:1], cell_1[:1]), enc[:1])


def test_differential_attention_lambda_schedule() -> None:
    assert lambda_init_for_depth(0) == pytest.approx(0.2)
    assert lambda_init_for_depth(3) == pytest.approx(0.8 - 0.6 * 0.40656966, rel=1e-6)
    attn = DifferentialAttention(16, 2, depth=1)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    assert attn(x, ctx).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="divisible"):
        DifferentialAttention(12, 4, depth=0)
