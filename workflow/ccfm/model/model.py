"""The CCFM network: an scDFM-style perturbation backbone with a second (scGPT latent) stream.

Read top to bottom, this file is the whole network:

1. *Embeddings* — :class:`GeneEncoder` (one vector per gene, shared with CRISPR perturbations),
   :class:`ContinuousValueEncoder` (one scalar expression value -> one vector),
   :class:`TimestepEmbedder` (DiT sinusoidal features + MLP) and :class:`LatentEmbedder`
   (per-gene scGPT feature, bottleneck D -> b -> d).
2. *Backbone blocks* — :class:`GeneAdaLN` (gene-wise modulation), :class:`DiffPerceiverBlock`
   (differential self- then cross-attention, adaLN-zero on the condition) and the plain
   :class:`PerceiverBlock`.
3. *Heads* — :class:`ExprDecoder` (per-gene expression velocity) and :class:`LatentDecoder`
   (its own adaLN blocks, ``dh_depth`` of them, zero-initialised output).
4. :class:`CascadedFlowModel` wiring it all as design.md §3 describes::

       tokens = fuse(value(cell_1) + gene, value(x_t) + gene) + latent_embed(z_t)
       c      = t_expr_emb + t_latent_emb + pert_emb
       tokens = blocks(tokens | gene adaLN, perturbation adapter, context = control stream, c)
       v_expr, v_latent = ExprDecoder(tokens, pert), LatentDecoder(tokens, c)

With ``latent_dim = 0`` the latent stream, its time embedding and its head do not exist: that is
the plain scDFM-style model (the ``ccfm_nolatent`` ablation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccfm.config import section_defaults
from ccfm.data.perturbations import PerturbationEncoder

_MODEL = section_defaults("model")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`CascadedFlowModel` (saved inside ``model.pt``)."""

    n_genes: int
    d_model: int = _MODEL["d_model"]
    nhead: int = _MODEL["nhead"]
    nlayers: int = _MODEL["nlayers"]
    dropout: float = _MODEL["dropout"]
    latent_dim: int = 512  # D of the scGPT features; 0 disables the latent stream
    bottleneck: int = _MODEL["bottleneck"]
    dh_depth: int = _MODEL["dh_depth"]
    fusion: str = _MODEL["fusion"]  # or "perceiver"
    perturbation_type: str = "gene"  # "gene" (CRISPR) or "drug"
    n_drugs: int = 0
    n_unmeasured_genes: int = 0  # perturbed genes outside the expression panel (own embedding rows)
    mlp_ratio: float = _MODEL["mlp_ratio"]
    max_value: float = 512.0  # value-encoder input clamp, as in scDFM
    # Zero the expression head's output layer: a fresh control-anchored flow then leaves its
    # starting point (the anchored control cell) unchanged.
    zero_init_expr_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    @property
    def latent_enabled(self) -> bool:
        return self.latent_dim > 0


# --------------------------------------------------------------------------------------------
# 1. Embeddings
# --------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """DiT modulation ``x * (1 + scale) + shift`` with per-sample (B, d) shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class GeneEncoder(nn.Module):
    """Gene-id embedding + LayerNorm. Row ``n_genes`` is the perturbation padding slot."""

    def __init__(self, n_genes: int, d_model: int) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.embedding = nn.Embedding(n_genes + 1, d_model)
        self.norm = nn.LayerNorm(d_model)

    @property
    def padding_id(self) -> int:
        return self.n_genes

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """One expression value per gene -> a d-vector: Linear(1,d) -> ReLU -> Linear -> LayerNorm."""

    # Knots of the first layer's hinges span the usual log1p range (see :meth:`reset_knots`).
    KNOT_RANGE = (0.0, 6.0)

    def __init__(self, d_model: int, dropout: float = 0.0, max_value: float = 512.0) -> None:
        super().__init__()
        self.max_value = max_value
        self.net = nn.Sequential(nn.Linear(1, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def reset_knots(self) -> None:
        """Hinges ``relu(w_j · (v − u_j))`` with knots ``u_j`` spread over :data:`KNOT_RANGE`.

        With zero first-layer biases every hidden unit is proportional to ``v`` for v > 0 and the
        final LayerNorm divides the scale away: all positive values would get one encoding, and a
        flow could not see *where* a cell is, only whether a gene is expressed (it then learns a
        per-gene constant velocity, i.e. a mean shift, and never the spread).
        """
        first = self.net[0]
        low, high = self.KNOT_RANGE
        knots = torch.linspace(low, high, first.out_features, dtype=first.weight.dtype)
        first.bias.copy_(-first.weight[:, 0] * knots)

    def forward(self, values: Tensor) -> Tensor:
        # The clamp keeps a wild noisy sample from blowing up the first linear layer.
        return self.dropout(self.net(values.clamp(max=self.max_value).unsqueeze(-1)))


class TimestepEmbedder(nn.Module):
    """Scalar time in [0, 1] -> d-vector: 256 sinusoidal frequencies (DiT) then an MLP."""

    def __init__(self, d_model: int, frequency_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def sinusoidal(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # Flow time lives in [0, 1]; DiT's frequencies were made for integer steps 0..1000, so
        # scale t up or the low frequencies would all read ~constant.
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoidal(t))


class LatentEmbedder(nn.Module):
    """Per-gene scGPT feature (B,G,D) -> token (B,G,d) through a bottleneck (Latent Forcing)."""

    def __init__(self, latent_dim: int, bottleneck: int, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, d_model))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# --------------------------------------------------------------------------------------------
# 2. Backbone blocks
# --------------------------------------------------------------------------------------------


class GeneAdaLN(nn.Module):
    """Gene-wise adaLN: ``x + gate * (LN(x) * scale + shift)``, modulation from the gene embedding."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 3 * d_model))

    def forward(self, gene_emb: Tensor, x: Tensor) -> Tensor:
        shift, gate, scale = self.modulation(gene_emb).chunk(3, dim=-1)
        return x + gate * (self.norm(x) * scale + shift)


def lambda_init_for_depth(depth: int) -> float:
    """Differential-transformer schedule λ_init = 0.8 − 0.6·exp(−0.3·depth)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DifferentialAttention(nn.Module):
    """Multi-head differential attention: ``(softmax(q1 k1ᵀ) − λ softmax(q2 k2ᵀ)) v``.

    Queries come from ``x``, keys and values from ``context`` (``context is x`` for self-attention).
    Each head's two maps share one value vector; the output is RMS-normalised per head and scaled
    by ``1 − λ_init`` (Ye et al., 2024). Both maps use fused scaled-dot-product attention, so the
    (G × G) maps are never materialised on GPU.
    """

    def __init__(self, d_model: int, nhead: int, depth: int) -> None:
        super().__init__()
        if d_model % (2 * nhead):
            raise ValueError(f"d_model={d_model} must be divisible by 2*nhead={2 * nhead} for differential attention")
        self.nhead = nhead
        self.head_dim = d_model // nhead // 2  # q/k dimension of each of the two maps
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.lambda_init = lambda_init_for_depth(depth)
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.head_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-6)

    def _lambda(self) -> Tensor:
        return (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum())
            - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
            + self.lambda_init
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, n_query, d_model = x.shape
        n_key = context.shape[1]
        # (B, L, 2h, hd) -> (B, 2h, L, hd); even/odd heads are the two maps of one head.
        q = self.q(x).view(batch, n_query, 2 * self.nhead, self.head_dim).transpose(1, 2)
        k = self.k(context).view(batch, n_key, 2 * self.nhead, self.head_dim).transpose(1, 2)
        v = self.v(context).view(batch, n_key, self.nhead, 2 * self.head_dim).transpose(1, 2)
        # Fused attention kernels need q/k and v of one head size: zero-pad q and k (dot products
        # unchanged) and keep the softmax scale of the real q/k size. Without this, PyTorch falls
        # back to its slow reference path.
        q = F.pad(q, (0, self.head_dim))
        k = F.pad(k, (0, self.head_dim))
        q1, q2 = q[:, 0::2], q[:, 1::2]
        k1, k2 = k[:, 0::2], k[:, 1::2]
        scale = self.head_dim**-0.5
        attn = F.scaled_dot_product_attention(q1, k1, v, scale=scale) - self._lambda() * F.scaled_dot_product_attention(
            q2, k2, v, scale=scale
        )
        attn = self.head_norm(attn) * (1 - self.lambda_init)
        return self.out(attn.transpose(1, 2).reshape(batch, n_query, d_model))


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention on fused scaled-dot-product kernels (queries x, keys context)."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.nhead = nhead
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, n_query, d_model = x.shape
        head = d_model // self.nhead
        q = self.q(x).view(batch, n_query, self.nhead, head).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, self.nhead, head).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        return self.out(attn.transpose(1, 2).reshape(batch, n_query, d_model))


def mlp(d_model: int, ratio: float, dropout: float = 0.0) -> nn.Sequential:
    hidden = int(d_model * ratio)
    return nn.Sequential(
        nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, d_model)
    )


class AdaLNZeroBlock(nn.Module):
    """DiT block: adaLN-zero modulated attention + MLP, conditioned on the (B, d) vector ``c``.

    ``attention`` is differential or plain. A ``cross`` block attends to a context (normalised
    by its own LayerNorm); a self-attention block has no such norm, so every parameter is used
    (DistributedDataParallel requires it). The modulation is zero-initialised by
    :meth:`CascadedFlowModel.initialize_weights`, so a fresh block is the identity.
    """

    def __init__(
        self, d_model: int, attention: nn.Module, mlp_ratio: float, dropout: float, cross: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.context_norm = nn.LayerNorm(d_model) if cross else None
        self.attention = attention
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(d_model, mlp_ratio, dropout)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        if (context is None) != (self.context_norm is None):
            raise ValueError("a cross-attention block needs a context and a self-attention block takes none")
        x = x + gate_a.unsqueeze(1) * self.attention(h, h if self.context_norm is None else self.context_norm(context))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiffPerceiverBlock(nn.Module):
    """scDFM's differential perceiver: differential self-attention over the gene tokens, then
    differential cross-attention from the tokens to the control-cell stream."""

    def __init__(self, d_model: int, nhead: int, depth: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.self_block = AdaLNZeroBlock(d_model, DifferentialAttention(d_model, nhead, depth), mlp_ratio, dropout)
        self.cross_block = AdaLNZeroBlock(
            d_model, DifferentialAttention(d_model, nhead, depth), mlp_ratio, dropout, cross=True
        )

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> Tensor:
        return self.cross_block(self.self_block(x, c), c, context)


class PerceiverBlock(nn.Module):
    """Plain perceiver: cross-attention to the control stream, then adaLN-zero self-attention + MLP."""

    def __init__(self, d_model: int, nhead: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross = MultiHeadAttention(d_model, nhead)
        self.context_norm = nn.LayerNorm(d_model)
        self.self_block = AdaLNZeroBlock(d_model, MultiHeadAttention(d_model, nhead), mlp_ratio, dropout)

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> Tensor:
        x = x + self.cross(self.cross_norm(x), self.context_norm(context))
        return self.self_block(x, c)


# --------------------------------------------------------------------------------------------
# 3. Heads
# --------------------------------------------------------------------------------------------


class ExprDecoder(nn.Module):
    """Per-gene scalar from [token, perturbation embedding]: a 3-layer MLP (scDFM)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, tokens: Tensor, pert_emb: Tensor) -> Tensor:
        pert = pert_emb[:, None, :].expand(-1, tokens.shape[1], -1)
        return self.net(torch.cat([tokens, pert], dim=-1)).squeeze(-1)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear projection (DiT final layer; zero-initialised)."""

    def __init__(self, d_model: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d_model, out_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LatentDecoder(nn.Module):
    """Latent head: projection, ``dh_depth`` adaLN-zero self-attention blocks of its own, and a
    zero-initialised final layer -> per-gene latent velocity (B, G, D) (Latent Forcing's
    ``dh_blocks_dino`` + ``final_layer_dino``)."""

    def __init__(self, d_model: int, latent_dim: int, nhead: int, depth: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.blocks = nn.ModuleList(
            [AdaLNZeroBlock(d_model, MultiHeadAttention(d_model, nhead), mlp_ratio, dropout) for _ in range(depth)]
        )
        self.final = FinalLayer(d_model, latent_dim)

    def forward(self, tokens: Tensor, c: Tensor) -> Tensor:
        h = self.proj(tokens)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)


# --------------------------------------------------------------------------------------------
# 4. The cascaded model
# --------------------------------------------------------------------------------------------


class CascadedFlowModel(nn.Module):
    """Velocity network of CCFM for the expression stream and (optionally) the latent stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.gene_encoder = GeneEncoder(config.n_genes, d)
        self.perturbation_encoder = PerturbationEncoder(
            self.gene_encoder, config.perturbation_type, config.n_drugs, d, n_unmeasured=config.n_unmeasured_genes
        )
        self.control_value_encoder = ContinuousValueEncoder(d, config.dropout, config.max_value)
        self.noisy_value_encoder = ContinuousValueEncoder(d, config.dropout, config.max_value)
        self.fusion = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))
        self.t_expr_embedder = TimestepEmbedder(d)
        self.gene_adaln = nn.ModuleList([GeneAdaLN(d) for _ in range(config.nlayers)])
        self.pert_adapters = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(2 * d, d), nn.LeakyReLU(), nn.Dropout(config.dropout), nn.Linear(d, d), nn.LeakyReLU()
                )
                for _ in range(config.nlayers)
            ]
        )
        self.blocks = nn.ModuleList([self._make_block(i) for i in range(config.nlayers)])
        self.expr_decoder = ExprDecoder(d)
        if config.latent_enabled:
            self.latent_embedder = LatentEmbedder(config.latent_dim, config.bottleneck, d)
            self.t_latent_embedder = TimestepEmbedder(d)
            self.latent_decoder = LatentDecoder(
                d, config.latent_dim, config.nhead, config.dh_depth, config.mlp_ratio, config.dropout
            )
        self.initialize_weights()

    def _make_block(self, depth: int) -> nn.Module:
        cfg = self.config
        if cfg.fusion == "differential_perceiver":
            return DiffPerceiverBlock(cfg.d_model, cfg.nhead, depth, cfg.mlp_ratio, cfg.dropout)
        if cfg.fusion == "perceiver":
            return PerceiverBlock(cfg.d_model, cfg.nhead, cfg.mlp_ratio, cfg.dropout)
        raise ValueError(f"model fusion {cfg.fusion!r} is unknown: use 'differential_perceiver' or 'perceiver'")

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN-zero modulations and the latent output layer start at zero
        (so every block starts as the identity and the latent head predicts zero velocity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.gene_encoder.embedding.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (AdaLNZeroBlock, FinalLayer)):
                nn.init.zeros_(module.modulation[-1].weight)
                nn.init.zeros_(module.modulation[-1].bias)
        self.control_value_encoder.reset_knots()
        self.noisy_value_encoder.reset_knots()
        if self.config.latent_enabled:
            nn.init.zeros_(self.latent_decoder.final.linear.weight)
            nn.init.zeros_(self.latent_decoder.final.linear.bias)
        if self.config.zero_init_expr_head:
            nn.init.zeros_(self.expr_decoder.net[-1].weight)
            nn.init.zeros_(self.expr_decoder.net[-1].bias)

    # -- pieces reused outside the forward pass ------------------------------------------------

    def control_stream(self, gene_ids: Tensor, cell_1: Tensor) -> tuple[Tensor, Tensor]:
        """(gene embedding, control-cell tokens = value(cell_1) + gene embedding), both (B,G,d)."""
        gene_emb = self.gene_encoder(gene_ids)
        return gene_emb, self.control_value_encoder(cell_1) + gene_emb

    def encode_control(self, gene_ids: Tensor, cell_1: Tensor) -> Tensor:
        """The defined control-cell encoding, (B, d): the control stream mean-pooled over genes.

        This is what the model "sees" of a source cell, so an MMD shift adaptation that makes
        target-context controls look like source controls matches on this vector. It is
        differentiable in ``cell_1`` (the shift acts on expression, the encoder after it).
        """
        _, control_tokens = self.control_stream(gene_ids, cell_1)
        return control_tokens.mean(dim=1)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        gene_ids: Tensor,
        cell_1: Tensor,
        x_t: Tensor,
        z_t: Tensor | None,
        t_expr: Tensor,
        t_latent: Tensor | None,
        pert_ids: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Velocities for both streams.

        Args:
            gene_ids: (B, G) indices into the dataset's gene list.
            cell_1: (B, G) control (source) expression, log1p.
            x_t: (B, G) noisy perturbed expression at time ``t_expr``.
            z_t: (B, G, D) noisy normalised scGPT features at ``t_latent`` (None without latent).
            t_expr, t_latent: (B,) flow times in [0, 1].
            pert_ids: (B, 2) perturbation ids (see :mod:`ccfm.data.perturbations`).

        Returns:
            ``(v_expr (B, G), v_latent (B, G, D))``; ``v_latent`` is None without latent stream.
        """
        gene_emb, control_tokens = self.control_stream(gene_ids, cell_1)
        noisy_tokens = self.noisy_value_encoder(x_t) + gene_emb
        x = self.fusion(torch.cat([control_tokens, noisy_tokens], dim=-1))

        pert_emb = self.perturbation_encoder(pert_ids)
        c = self.t_expr_embedder(t_expr) + pert_emb
        if self.config.latent_enabled:
            if z_t is None or t_latent is None:
                raise ValueError("this model has a latent stream: pass z_t (B,G,D) and t_latent (B,)")
            # Latent Forcing: the two streams' tokens are added position by position.
            x = x + self.latent_embedder(z_t)
            c = c + self.t_latent_embedder(t_latent)

        pert_tokens = pert_emb[:, None, :].expand(-1, x.shape[1], -1)
        for gene_adaln, adapter, block in zip(self.gene_adaln, self.pert_adapters, self.blocks):
            x = gene_adaln(gene_emb, x)
            x = adapter(torch.cat([x, pert_tokens], dim=-1))
            x = block(x, control_tokens, c)

        v_expr = self.expr_decoder(x, pert_emb)
        v_latent = self.latent_decoder(x, c) if self.config.latent_enabled else None
        return v_expr, v_latent
