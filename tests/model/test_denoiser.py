"""CascadedDenoiser: time sampling marginals, paths, loss weights, MMD and cascaded generation."""

from __future__ import annotations

import pytest
import torch

from ccfm.model.denoiser import CascadedDenoiser, FlowSettings, FlowStart, Integration, weighted_mean
from ccfm.model.mmd import multiscale_rbf_mmd
from ccfm.model.model import CascadedFlowModel, ModelConfig

N_GENES, B, G, D = 30, 4, 10, 8


def _denoiser(latent_dim: int = D, **settings) -> CascadedDenoiser:
    torch.manual_seed(0)
    model = CascadedFlowModel(
        ModelConfig(n_genes=N_GENES, d_model=32, nhead=4, nlayers=1, latent_dim=latent_dim, bottleneck=8, dh_depth=1)
    )
    # The plain cascade (clean latent in the expression branch, unit latent weight) unless a test says otherwise.
    return CascadedDenoiser(model, FlowSettings(**{"stage2_noised": False, "latent_weight": 1.0, **settings}))


def _batch():
    g = torch.Generator().manual_seed(3)
    gene_ids = torch.arange(G).expand(B, -1)
    source = torch.rand(B, G, generator=g) * 2
    target = torch.rand(B, G, generator=g) * 2
    z = torch.randn(B, G, D, generator=g)
    pert = torch.tensor([[1, N_GENES]] * B)
    return gene_ids, source, target, pert, z


def test_sample_t_marginals_uniform() -> None:
    den = _denoiser(choose_latent_p=0.4)
    n = 20000
    ts = den.sample_t(n, generator=torch.Generator().manual_seed(0))
    latent = ts.w_latent > 0
    # P(latent branch) = choose_latent_p (binomial sd = 0.0035)
    assert latent.float().mean().item() == pytest.approx(0.4, abs=0.015)
    torch.testing.assert_close(ts.w_expr, 1 - ts.w_latent)
    assert torch.all(ts.t_expr[latent] == 0)  # expression stream is pure noise
    assert torch.all(ts.t_latent[~latent] == 1)  # latent is clean in the expression branch
    # the trained stream's time is U(0,1): mean 1/2, variance 1/12
    for t in (ts.t_latent[latent], ts.t_expr[~latent]):
        assert t.mean().item() == pytest.approx(0.5, abs=0.015)
        assert t.var().item() == pytest.approx(1 / 12, abs=0.005)


def test_sample_t_logit_normal_and_noised_stage2() -> None:
    den = _denoiser(time_schedule="logit_normal", stage2_noised=True, noised_low=0.75)
    ts = den.sample_t(20000, generator=torch.Generator().manual_seed(1))
    latent = ts.w_latent > 0

    def logit(t):
        return torch.log(t / (1 - t))

    assert logit(ts.t_latent[latent]).mean().item() == pytest.approx(-1.2, abs=0.05)
    assert logit(ts.t_latent[latent]).std().item() == pytest.approx(1.0, abs=0.05)
    assert logit(ts.t_expr[~latent]).mean().item() == pytest.approx(-0.4, abs=0.05)
    stage2 = ts.t_latent[~latent]
    assert stage2.min().item() >= 0.75 and stage2.max().item() <= 1.0
    assert stage2.mean().item() == pytest.approx(0.875, abs=0.01)


def test_sample_t_without_latent_trains_expression_only() -> None:
    ts = _denoiser(latent_dim=0, choose_latent_p=0.4).sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert torch.all(ts.w_expr == 1) and torch.all(ts.w_latent == 0)
    assert ts.t_expr.min() > 0 and ts.t_expr.std() > 0.2


def test_interpolate_is_affine_cond_ot() -> None:
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3) * 4
    out = CascadedDenoiser.interpolate(x0, x1, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0] * 3, [4.0] * 3]))
    z = CascadedDenoiser.interpolate(torch.zeros(2, 3, 2), torch.ones(2, 3, 2), torch.tensor([0.5, 0.0]))
    assert z[0].eq(0.5).all() and z[1].eq(0).all()


def test_weighted_mean_ignores_zero_weight_samples() -> None:
    assert weighted_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(2.0)
    assert weighted_mean(torch.tensor([5.0]), torch.tensor([0.0])).item() == 0.0


def test_loss_branches_respect_weights() -> None:
    gene_ids, source, target, pert, z = _batch()
    only_latent = _denoiser(choose_latent_p=1.0, mmd=False).loss(
        gene_ids, source, target, pert, z, torch.Generator().manual_seed(0)
    )
    assert only_latent["expr"].item() == 0 and only_latent["latent"].item() > 0
    only_expr = _denoiser(choose_latent_p=0.0, mmd=False).loss(
        gene_ids, source, target, pert, z, torch.Generator().manual_seed(0)
    )
    assert only_expr["latent"].item() == 0 and only_expr["expr"].item() > 0
    # With the zero-initialised latent head, v_latent = 0, so the latent loss is mean |z1 - z0|² (≈ E z1² + 1),
    # z0 being the noise the seeded generator draws after the times and the expression noise.
    generator = torch.Generator().manual_seed(0)
    _denoiser(choose_latent_p=1.0, mmd=False).sample_t(B, generator=generator)
    torch.randn((B, G), generator=generator)  # x0
    z0 = torch.randn((B, G, D), generator=generator)
    assert only_latent["latent"].item() == pytest.approx((z - z0).pow(2).mean().item(), rel=1e-6)
    assert only_latent["total"].item() == pytest.approx(only_latent["latent"].item())


def test_loss_is_deterministic_for_a_generator() -> None:
    den = _denoiser()
    args = _batch()
    a = den.loss(*args, generator=torch.Generator().manual_seed(5))
    b = den.loss(*args, generator=torch.Generator().manual_seed(5))
    assert a["total"].item() == b["total"].item()
    assert a["mmd"].item() != 0  # MMD on by default, gamma 0.5


def test_training_mmd_separates_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    same = multiscale_rbf_mmd(x, torch.randn(64, 5, generator=g))
    shifted = multiscale_rbf_mmd(x, torch.randn(64, 5, generator=g) + 2.0)
    assert abs(same.item()) < 0.05 and shifted.item() > 0.5
    # a collapsed batch does not give NaN (the bandwidth is floored)
    assert torch.isfinite(multiscale_rbf_mmd(torch.zeros(4, 3), torch.zeros(4, 3)))


def test_generate_shapes_nonnegative_and_reproducible() -> None:
    den = _denoiser().eval()
    gene_ids, source, _, pert, _ = _batch()
    x, z = den.generate(gene_ids, source, pert, Integration(3, 3), FlowStart(torch.Generator().manual_seed(0)))
    assert x.shape == (B, G) and z is not None and z.shape == (B, G, D)
    assert (x >= 0).all() and (x == 0).any()  # clamped at 0 (Gaussian start gives negatives)
    x2, _ = den.generate(gene_ids, source, pert, Integration(3, 3), FlowStart(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(x, x2)
    x_nl, z_nl = (
        _denoiser(latent_dim=0)
        .eval()
        .generate(gene_ids, source, pert, Integration(3, 3, "euler"), FlowStart(torch.Generator().manual_seed(0)))
    )
    assert x_nl.shape == (B, G) and z_nl is None


def test_stage2_uses_the_stage1_latent() -> None:
    den = _denoiser().eval()
    gene_ids, source, _, pert, z = _batch()
    steps = Integration(latent_steps=2, expr_steps=3, method="euler")
    x_a, z_a = den.generate(gene_ids, source, pert, steps, FlowStart(torch.Generator().manual_seed(0)), latent=z)
    x_b, _ = den.generate(gene_ids, source, pert, steps, FlowStart(torch.Generator().manual_seed(0)), latent=z + 3.0)
    assert z_a is z
    assert (x_a - x_b).abs().max().item() > 1e-3  # same noise, different latent -> different cells
    # and stage 1 feeds stage 2: generate() == stage 1 then stage 2 on its output
    gen = torch.Generator().manual_seed(7)
    x_full, z_full = den.generate(gene_ids, source, pert, steps, FlowStart(gen))
    start = FlowStart(torch.Generator().manual_seed(7))
    z_stage1 = den.generate_latent(gene_ids, source, pert, steps, start)
    x_stage2 = den.generate_expression(gene_ids, source, pert, z_stage1, steps, start).clamp(min=0)
    torch.testing.assert_close(z_full, z_stage1)
    torch.testing.assert_close(x_full, x_stage2)


def test_x_prediction_converts_to_velocity() -> None:
    den = _denoiser(prediction="x")
    x_t, t = torch.ones(2, 3), torch.tensor([0.5, 0.99])
    v = den._to_velocity(torch.full((2, 3), 3.0), x_t, t)
    torch.testing.assert_close(v[0], torch.full((3,), 4.0))  # (3-1)/(1-0.5)
    torch.testing.assert_close(v[1], torch.full((3,), 40.0))  # denominator clamped at 0.05


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="time_schedule"):
        FlowSettings(time_schedule="cubic")
    den = _denoiser()
    gene_ids, source, _, pert, _ = _batch()
    with pytest.raises(ValueError, match="generate.method"):
        den.generate(gene_ids, source, pert, Integration(2, 2, method="leapfrog"))
