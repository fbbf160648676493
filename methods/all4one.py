"""All4One: symbiotic neighbour contrastive learning (docs/methods/all4one.md).

NNCLR's neighbour contrast plus two objectives: a centroid contrast, where a small transformer
summarises each sample's K nearest support-set neighbours into one token that is contrasted across
views, and a redundancy-reduction term on the cross-view feature correlation matrix. Neighbours are
looked up with momentum embeddings; the support set holds view 1's momentum embeddings.

The default options reproduce the official code (ImaGonEs/all4one; solo-learn ``all4one.py``):

- ``pos_enc=permuted``: the positional table of ``Summer(PositionalEncodingPermute1D(5))``, which
  treats the feature indices as positions and the K slots as channels (``permuted_position_table``);
  ``standard`` is a Vaswani table over the K slots.
- ``centroid_temperature=0.1``: ``nnclr_loss_func``'s implicit default for the centroid term, while
  the neighbour term uses ``temperature=0.2``.
- ``nn_source=momentum``: view 2's neighbours come from its momentum embedding; ``online`` uses the
  online projection, as the paper's figure draws it.
- ``feature_loss=rms``: root-mean-square on/off-diagonal terms on column-normalised features
  (``feature_rms_loss``); ``barlow`` is Barlow Twins with λ = 5e-3 (``feature_barlow_loss``).
- ``feature_stats=local``: the feature term uses each process's own rows, so with W > 1 processes
  the default is by design not the one-process computation; ``global`` gathers first and is
  W-invariant like every other term.
- ``exclude_self=false`` and ``queue_init=random_unit`` as in NNCLR.

The official ``save_NN`` pickle dump and the fork's ``audioop`` import are dead code and are not
reproduced (docs/methods/all4one.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import (
    MethodConfigError,
    SSLMethod,
    check_choice,
    check_matrices,
    check_positive,
)
from methods.blocks import (
    COSINE_EPS,
    FeatureQueue,
    IndexLabelsMixin,
    MomentumEncoder,
    build_nnclr_predictor,
    build_nnclr_projector,
    float32_region,
    gather,
    l2_normalize,
)
from methods.nnclr import (
    QUEUE_INITS,
    neighbour_metrics,
    nn_infonce,
    nnclr_loss,
    support_neighbours,
)

POS_ENCODINGS = ("permuted", "standard")
FEATURE_LOSSES = ("rms", "barlow")
FEATURE_STATS = ("local", "global")
NN_SOURCES = ("momentum", "online")
MOMENTUM_SCHEDULES = ("constant", "cosine")


def momentum_at(base: float, final: float, step: int, total_steps: int, schedule: str) -> float:
    """Momentum for ``step``: constant ``base``, or BYOL's cosine from ``base`` to ``final``."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
    raise MethodConfigError(f"invalid momentum schedule {schedule!r}; valid: constant, cosine")


# --------------------------------------------------------------------------------------------
# positional tables
# --------------------------------------------------------------------------------------------
def sinusoid_table(length: int, channels: int) -> torch.Tensor:
    """The sin/cos table of ``positional-encodings``' ``PositionalEncoding1D(channels)``, (length, C).

    With C' = 2·⌈C/2⌉ and ω_j = 1 / 10000^{2j/C'} (j = 0..C'/2−1, a float32 buffer as in the
    package): table[x, 2j] = sin(x·ω_j), table[x, 2j+1] = cos(x·ω_j), columns cut to C. Evaluated
    in float32, as the official runs evaluate it.
    """
    even = int(math.ceil(channels / 2) * 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, even, 2).float() / even))
    angles = torch.einsum("i,j->ij", torch.arange(length).float(), inv_freq)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2, -1)
    return table[:, :channels].contiguous()


def permuted_position_table(k: int, dim: int) -> torch.Tensor:
    """The official additive table, (k, dim): PE[s, u] = sin(u·ω_{s/2}) for even slot s and
    cos(u·ω_{(s−1)/2}) for odd s, ω_j = 1/10000^{2j/C'}, C' = 2·⌈k/2⌉.

    ``PositionalEncodingPermute1D(k)`` expects (batch, channels, length) but receives
    (batch, k, dim), so the dim feature indices u = 0..dim−1 act as positions and the k sequence
    slots as channels (docs/methods/all4one.md §3). For k = 5 the rows have L2 norms ≈ 11.3,
    11.3, 11.5, 11.1, 4.9, about ten times the unit-norm tokens they are added to.
    """
    return sinusoid_table(dim, k).T.contiguous()


def standard_position_table(k: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table over the k slots, (k, dim): PE[s, 2j] = sin(s·ω_j),
    PE[s, 2j+1] = cos(s·ω_j), ω_j = 1/10000^{2j/dim} (the clean variant)."""
    return sinusoid_table(k, dim)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def centroid_sequences(
    neighbours: torch.Tensor, centroid_pred: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's two input sequences for one view, each (B, K, D).

    S = NN + PE (the K neighbours, most similar first) and, by the figure's shift operation,
    T = [c ; NN[:, 0:K−1]] + PE: the centroid predictor output c (not normalised) takes slot 0 and
    the K-th neighbour is dropped. Both run in float32 (float64 inputs stay float64).
    """
    if neighbours.ndim != 3 or centroid_pred.shape != (neighbours.shape[0], neighbours.shape[2]):
        raise ValueError(
            f"neighbours must be (B, K, D) and the prediction (B, D), got "
            f"{tuple(neighbours.shape)} and {tuple(centroid_pred.shape)}"
        )
    k = neighbours.shape[1]
    dtype = torch.promote_types(neighbours.dtype, torch.float32)
    neighbours = neighbours.to(dtype)
    table = table.to(neighbours.device, dtype)
    rich = neighbours + table
    shifted = torch.cat([centroid_pred.to(dtype).unsqueeze(1), neighbours[:, : k - 1]], dim=1) + table
    return rich, shifted


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    # Row-major off-diagonal entries of a square matrix, by a reshape of fixed shape (a boolean
    # mask's output shape would depend on data, a graph break under torch.compile).
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def feature_rms_loss(
    m1: torch.Tensor, z1: torch.Tensor, m2: torch.Tensor, z2: torch.Tensor, scale: float = 10.0
) -> torch.Tensor:
    """All4One's redundancy reduction (official, not Barlow Twins' form).

    With n(x) the L2 normalisation of each column of x over the batch (no centring),
    A = n(m1)ᵀ·n(z2) and A′ = n(m2)ᵀ·n(z1), both D×D:

        on  = sqrt( ½·[ mean_u (A_uu − 1)² + mean_u (A′_uu − 1)² ] )
        off = sqrt( ½·[ mean_{u≠v} A_uv²   + mean_{u≠v} A′_uv²   ] )
        L   = scale · (½·on + ½·off)

    m_a are the momentum embeddings (constants), z_a the online projections. Any B ≥ 1; D ≥ 2
    (with D = 1 there is no off-diagonal entry to average).
    """
    check_matrices("feature_rms_loss", min_dim=2, m1=m1, z1=z1, m2=m2, z2=z2)
    with float32_region(z1):
        def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a = F.normalize(a.float(), dim=0, eps=COSINE_EPS)
            b = F.normalize(b.float(), dim=0, eps=COSINE_EPS)
            return a.T @ b

        def rms(mean_square: torch.Tensor) -> torch.Tensor:
            # d sqrt(x)/dx is infinite at x = 0 (e.g. no off-diagonal correlation at all), which
            # would put NaN into every weight; below float32's smallest normal the gradient is 0
            # instead, and every value from there up is the plain square root.
            return mean_square.clamp_min(torch.finfo(torch.float32).tiny).sqrt()

        a, a2 = corr(m1, z2), corr(m2, z1)
        on = rms(0.5 * ((a.diagonal() - 1).pow(2).mean() + (a2.diagonal() - 1).pow(2).mean()))
        off = rms(0.5 * (_off_diagonal(a).pow(2).mean() + _off_diagonal(a2).pow(2).mean()))
        return scale * (0.5 * on + 0.5 * off)


def feature_barlow_loss(
    m1: torch.Tensor, z1: torch.Tensor, m2: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3
) -> torch.Tensor:
    """Barlow Twins on the same pairs (the clean option ``feature_loss=barlow``).

    With s(x) = (x − mean) / sqrt(var + 1e-5) per column over the N rows (BatchNorm without affine,
    biased variance) and C = s(m1)ᵀ·s(z2) / N, C′ = s(m2)ᵀ·s(z1) / N:

        BT(C) = Σ_u (1 − C_uu)² + λ·Σ_{u≠v} C_uv²,   L = ½·[ BT(C) + BT(C′) ]
    """
    check_matrices("feature_barlow_loss", m1=m1, z1=z1, m2=m2, z2=z2)
    with float32_region(z1):
        def standardise(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + 1e-5)

        def barlow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            c = standardise(a).T @ standardise(b) / a.shape[0]
            return (1 - c.diagonal()).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()

        return 0.5 * (barlow(m1, z2) + barlow(m2, z1))


def centroid_loss(
    rich: list[torch.Tensor], shifted: list[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """L_cent = ½·info(C^nn_1, C^p_2, τ_c) + ½·info(C^nn_2, C^p_1, τ_c), with C^nn_a the
    transformer's token-0 output for S_a, C^p_a for T_a, and info the cross-view InfoNCE of
    ``methods.nnclr.nn_infonce`` (local anchors, gathered candidates)."""
    if len(rich) != 2 or len(shifted) != 2:
        raise ValueError(
            f"centroid_loss takes the two views' outputs, got {len(rich)} rich and "
            f"{len(shifted)} shifted"
        )
    check_matrices("centroid_loss", rich1=rich[0], rich2=rich[1], shifted1=shifted[0],
                   shifted2=shifted[1])
    return 0.5 * nn_infonce(rich[0], shifted[1], temperature) + 0.5 * nn_infonce(
        rich[1], shifted[0], temperature
    )


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
def _dropout_noise(
    shape: tuple[int, ...], p: float, like: torch.Tensor, swap01: bool = False
) -> torch.Tensor:
    """F.dropout's CPU mask for an input of ``shape``: ``empty_like(input).bernoulli_(1 − p)
    .div_(1 − p)``. ``swap01``: the input is the (0, 1)-transpose of a contiguous tensor, so the
    draw fills that memory order (the CPU kernel draws in memory order)."""
    if swap01:
        shape = (shape[1], shape[0], *shape[2:])
    noise = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    noise.div_(1 - p)
    return noise.transpose(0, 1) if swap01 else noise


def _slot0_attention(attn: nn.MultiheadAttention, x: torch.Tensor, p_attn: float) -> torch.Tensor:
    """Slot 0's attention output before ``out_proj``, (B, 1, E), with the keys and values folded
    into its query. Per head h, slot l's score is q·(W_k x_l + b_k) = (W_kᵀ q)·x_l + q·b_k and the
    output is Σ_l a_l (W_v x_l + b_v) = W_v (Σ_l a_l x_l) + b_v Σ_l a_l (a: the dropped-out
    attention weights), so no slot's key or value is projected: a quarter of the FLOPs of the
    projections it replaces at K = 5. The dropout mask is drawn whole, (B, H, L, L), as before."""
    batch, length, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    w_k, w_v = weight[dim:].view(2, heads, head_dim, dim).unbind(0)
    b_k, b_v = bias[dim:].view(2, heads, head_dim).unbind(0)
    q = F.linear(x[:, 0], weight[:dim], bias[:dim]).view(batch, heads, head_dim) * head_dim**-0.5
    scores = torch.einsum("bhe,ble->bhl", torch.einsum("bhd,hde->bhe", q, w_k), x)
    weights = (scores + (q * b_k).sum(-1, keepdim=True)).softmax(dim=-1)
    if p_attn > 0:
        weights = weights * _dropout_noise((batch, heads, length, length), p_attn, x)[:, :, 0]
    mixed = torch.einsum("bhl,ble->bhe", weights, x)
    out = torch.einsum("bhe,hde->bhd", mixed, w_v) + b_v * weights.sum(-1, keepdim=True)
    return out.reshape(batch, 1, dim)


def _encoder_layer(
    layer: nn.TransformerEncoderLayer, x: torch.Tensor, first_only: bool,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """One post-norm ReLU ``TransformerEncoderLayer`` (batch-first, no mask) in training or eval
    mode, with the module's parameters and its dropout draws in its order, shapes and memory
    layouts: attention weights (B, H, L, L), attention output (B, L, E) laid out as (L, B, E),
    feed-forward hidden (B, L, F), feed-forward output (B, L, E). ``first_only``: only slot 0's
    output, (B, 1, E), its attention folded (``_slot0_attention``); the masks are drawn whole.
    ``projection``: ``x``'s query-key-value projection (B, L, 3E), if the caller has it already
    (not with ``first_only``)."""
    attn = layer.self_attn
    batch, length, dim = x.shape
    p_attn = attn.dropout if attn.training else 0.0
    p1, p_ff, p2 = (
        d.p if d.training else 0.0 for d in (layer.dropout1, layer.dropout, layer.dropout2)
    )
    if first_only:
        rows = 1
        out = _slot0_attention(attn, x, p_attn)
    else:
        rows = length
        heads = attn.num_heads
        head_dim = dim // heads
        qkv = projection
        if qkv is None:
            qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).unbind(2)
        # scaled_dot_product_attention's math path: q and k each scaled by head_dim^(−1/4)
        scale = head_dim ** -0.25
        scores = torch.matmul((q * scale).transpose(1, 2), (k * scale).permute(0, 2, 3, 1))
        weights = scores.softmax(dim=-1)
        if p_attn > 0:
            weights = weights * _dropout_noise((batch, heads, length, length), p_attn, x)
        out = torch.matmul(weights, v.transpose(1, 2)).transpose(1, 2).reshape(batch, rows, dim)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    if p1 > 0:
        out = out * _dropout_noise((batch, length, dim), p1, x, swap01=True)[:, :rows]
    y = layer.norm1(x[:, :rows] + out)
    hidden = F.relu(layer.linear1(y))
    if p_ff > 0:
        hidden = hidden * _dropout_noise((batch, length, hidden.shape[-1]), p_ff, x)[:, :rows]
    out = layer.linear2(hidden)
    if p2 > 0:
        out = out * _dropout_noise((batch, length, dim), p2, x)[:, :rows]
    return layer.norm2(y + out)


class CentroidTransformer(nn.TransformerEncoder):
    """The official centroid transformer (post-norm, ReLU, batch-first, no final norm) whose
    forward returns only the slot-0 output, (B, D): the only output All4One uses.

    Parameters, their names and the dropout draws are ``nn.TransformerEncoder``'s, so the same
    RNG state gives the same masks and the result is ``nn.TransformerEncoder(...)(x)[:, 0]`` up to
    float rounding. On the CPU the layers run batch-first without MultiheadAttention's (L, B, E)
    copies, and the last layer computes only slot 0's row, with its keys and values folded into
    its query (``_slot0_attention``): ~25 % fewer FLOPs. Other devices run the standard
    module (its fused attention draws its own dropout masks there).
    """

    def forward(  # type: ignore[override]
        self, src: torch.Tensor, projection: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Slot 0's output for ``src`` (B, L, D). ``projection``: the first layer's query-key-value
        projection of ``src``, ``F.linear(src, in_proj_weight, in_proj_bias)``, where the caller
        has it at a lower cost (``encode``); the CPU path then uses it, other devices ignore it."""
        if src.device.type != "cpu":
            return super().forward(src)[:, 0]
        x = src
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            given = projection if i == 0 and i != last else None
            x = _encoder_layer(layer, x, first_only=i == last, projection=given)
        return x[:, 0]

    def encode(
        self, neighbours: list[torch.Tensor], centroid_preds: list[torch.Tensor],
        table: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Enc(S_1), Enc(S_2), Enc(T_1), Enc(T_2) from each view's neighbours (B, K, D), centroid
        prediction (B, D) and the positional table (K, D) (``centroid_sequences``): four calls in
        the official order, so that the dropout masks are the official code's under the same RNG
        state.

        On the CPU the first layer's projection of the K neighbours is computed once per view and
        shared by S and T: with W the query-key-value weight and b its bias, (n_j + e_l)Wᵀ + b =
        n_jWᵀ + (e_lWᵀ + b), and T's slots 1..K−1 hold S's neighbours 0..K−2 under other position
        rows e_l. Only T's slot 0, c + e_0, is projected on its own.
        """
        rich, shifted = zip(
            *(centroid_sequences(nn_a, c_a, table)
              for nn_a, c_a in zip(neighbours, centroid_preds, strict=True)),
            strict=True,
        )
        sequences = [*rich, *shifted]
        if sequences[0].device.type != "cpu" or len(self.layers) < 2:
            return [self(seq) for seq in sequences]
        attn = self.layers[0].self_attn
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        table = table.to(sequences[0].device, sequences[0].dtype)
        k = table.shape[0]
        table_projection = F.linear(table, weight, bias)
        rich_projections, shifted_projections = [], []
        for seq_t, nn_a in zip(shifted, neighbours, strict=True):
            shared = F.linear(nn_a.to(seq_t.dtype), weight)
            rich_projections.append(shared + table_projection)
            slot0 = F.linear(seq_t[:, :1], weight, bias)
            shifted_projections.append(
                torch.cat([slot0, shared[:, : k - 1] + table_projection[1:]], dim=1)
            )
        projections = [*rich_projections, *shifted_projections]
        return [self(seq, proj) for seq, proj in zip(sequences, projections, strict=True)]


def build_centroid_transformer(
    dim: int, heads: int, ff_dim: int, dropout: float, layers: int
) -> CentroidTransformer:
    """``nn.TransformerEncoder`` as in the official code: post-norm, ReLU, batch-first, no final
    norm, returning slot 0's output (``CentroidTransformer``). The layer is deep-copied ``layers``
    times, so all layers start with equal weights."""
    layer = nn.TransformerEncoderLayer(
        d_model=dim, nhead=heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True
    )
    return CentroidTransformer(layer, num_layers=layers, enable_nested_tensor=False)


@dataclass
class All4OneConfig:
    """Defaults: ImaGonEs/all4one and solo-learn scripts/pretrain/cifar/all4one.yaml (``solo``)."""

    preset: str = "solo"
    temperature: float = 0.2  # neighbour term L_nn
    centroid_temperature: float = 0.1  # centroid term L_cent: nnclr_loss_func's implicit default
    n_neighbors: int = 5  # K, hard-coded in the official code; the positional table follows K
    # Support set M, a multiple of the global batch; digits: 1024. ImageNet-100's config says
    # 98,340, not a multiple of 256 (a typo): 98,304 here.
    queue_size: int = 98304
    queue_init: str = "random_unit"  # random_unit (official) | empty
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    nn_weight: float = 0.5
    centroid_weight: float = 0.5
    feature_weight: float = 0.5
    feature_scale: float = 10.0  # L_feat = scale·(½·on + ½·off) for feature_loss=rms
    feature_loss: str = "rms"  # rms (official root-mean-square terms) | barlow (Barlow Twins)
    barlow_lambda: float = 5e-3  # off-diagonal weight of feature_loss=barlow
    feature_stats: str = "local"  # local (official: each process's own rows) | global (gathered)
    pos_enc: str = "permuted"  # permuted (official table: feature indices as positions) | standard
    nn_source: str = "momentum"  # view 2's neighbours from its momentum (official) | online embedding
    exclude_self: bool = False  # True: mask stored copies of the anchor image before the top-k
    momentum_base: float = 0.99  # EMA of backbone and projector, from base to final over steps
    momentum_final: float = 1.0
    momentum_schedule: str = "cosine"  # cosine | constant
    transformer_lr: float = 0.1  # fixed, not batch-scaled; same schedule, LARS and decay rules
    transformer_layers: int = 3
    transformer_heads: int = 8
    transformer_ff_dim: int | None = None  # None: 2·proj_output_dim (512)
    transformer_dropout: float = 0.1


@register_method("all4one")
class All4One(IndexLabelsMixin, SSLMethod):
    Config = All4OneConfig
    base_presets = ("nnclr",)  # All4One adds two objectives to NNCLR
    paper_aliases = ("all4one",)
    # the default heads and 98,304-row support set take ~20 s per step on two CPU cores
    small_options = {"proj_hidden_dim": 256, "pred_hidden_dim": 256}
    # official: the feature term uses each process's own rows
    world_invariant_options = {"feature_stats": "global"}
    step_time_vs_simclr = 1.5
    optimizer_defaults = {
        "name": "lars", "lr": 1.0, "lr_scaling": "linear", "lr_reference_batch": 256,  # lr × B/256
        "weight_decay": 1.0e-5, "momentum": 0.9, "trust_coefficient": 0.02, "trust_clip": True,
        "exclude_1d": True, "schedule": "warmup_cosine", "warmup_epochs": 10,
    }
    dataset_defaults = {"digits": {"queue_size": 1024}}

    @classmethod
    def validate_config(cls, config: All4OneConfig) -> None:
        check_choice("method.queue_init", config.queue_init, QUEUE_INITS)
        check_choice("method.feature_loss", config.feature_loss, FEATURE_LOSSES)
        check_choice("method.feature_stats", config.feature_stats, FEATURE_STATS)
        check_choice("method.pos_enc", config.pos_enc, POS_ENCODINGS)
        check_choice("method.nn_source", config.nn_source, NN_SOURCES)
        check_choice("method.momentum_schedule", config.momentum_schedule, MOMENTUM_SCHEDULES)
        check_choice("method.exclude_self", config.exclude_self, (False, True))
        for key in (
            "temperature", "centroid_temperature", "n_neighbors", "queue_size", "proj_hidden_dim",
            "proj_output_dim", "pred_hidden_dim", "transformer_lr", "transformer_layers",
            "transformer_heads",
        ):
            check_positive(f"method.{key}", getattr(config, key))
        for key in ("nn_weight", "centroid_weight", "feature_weight", "feature_scale",
                    "barlow_lambda"):
            check_positive(f"method.{key}", getattr(config, key), allow_zero=True)
        if config.transformer_ff_dim is not None:
            check_positive("method.transformer_ff_dim", config.transformer_ff_dim)
        if config.proj_output_dim % config.transformer_heads:
            raise MethodConfigError(
                f"method.transformer_heads={config.transformer_heads} must divide "
                f"method.proj_output_dim={config.proj_output_dim}"
            )
        if not 0.0 <= config.transformer_dropout < 1.0:
            raise MethodConfigError(
                f"invalid method.transformer_dropout={config.transformer_dropout}; valid: [0, 1)"
            )
        for key in ("momentum_base", "momentum_final"):
            if not 0.0 <= getattr(config, key) <= 1.0:
                raise MethodConfigError(f"invalid method.{key}={getattr(config, key)}; valid: [0, 1]")

    def __init__(self, backbone: nn.Module, config: All4OneConfig) -> None:
        super().__init__(backbone, config)
        dim = config.proj_output_dim
        self.projector = build_nnclr_projector(self.feature_dim, config.proj_hidden_dim, dim)
        self.predictor = build_nnclr_predictor(dim, config.pred_hidden_dim)
        self.centroid_predictor = build_nnclr_predictor(dim, config.pred_hidden_dim)
        self.transformer = build_centroid_transformer(
            dim, config.transformer_heads, config.transformer_ff_dim or 2 * dim,
            config.transformer_dropout, config.transformer_layers,
        )
        self.momentum_encoder = MomentumEncoder(self._online())
        self.queue = FeatureQueue(config.queue_size, dim, init=config.queue_init)
        table = (permuted_position_table if config.pos_enc == "permuted" else
                 standard_position_table)(config.n_neighbors, dim)
        self.register_buffer("position_table", table, persistent=False)
        self.register_buffer("index_labels", None, persistent=False)

    def _online(self) -> nn.Sequential:
        # A fresh container each call, so backbone and projector are not registered twice.
        return nn.Sequential(self.backbone, self.projector)

    def official_view_kinds(self, dataset: str) -> list[str]:
        return ["byol1", "byol2"]  # BYOL's asymmetric pair, as solo-learn's configs

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        k = self.config.n_neighbors
        if batch_size <= k:
            raise MethodConfigError(
                f"all4one with method.n_neighbors={k} needs a batch of more than {k} images, got "
                f"batch_size={batch_size}"
            )
        self.queue.check_batch(batch_size)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The transformer at its own fixed lr (0.1, not batch-scaled; same schedule, LARS and
        decay rules), the rest at the peak lr; 1-D parameters apart in both."""
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
            (t, v): [] for t in (False, True) for v in (False, True)
        }
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[(name.startswith("transformer."), param.ndim <= 1)].append(param)
        lr = {"fixed_lr": self.config.transformer_lr}
        return [
            {"params": groups[(False, False)], "name": "weights"},
            {"params": groups[(False, True)], "name": "biases_and_norms", "is_1d": True},
            {"params": groups[(True, False)], "name": "transformer_weights", **lr},
            {"params": groups[(True, True)], "name": "transformer_biases_and_norms",
             "is_1d": True, **lr},
        ]

    @torch.no_grad()
    def _momentum_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.momentum_encoder(images).float())

    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"All4One takes 2 views, got {len(views)}")
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        c = [self.centroid_predictor(zi) for zi in z]
        m = [self._momentum_embeddings(v) for v in views]
        return self.loss_and_update(z, p, c, m, indices)

    def loss_and_update(
        self,
        z: list[torch.Tensor],
        p: list[torch.Tensor],
        c: list[torch.Tensor],
        m: list[torch.Tensor],
        indices: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Lookups, the three terms and the queue push from online projections ``z``, neighbour
        and centroid predictions ``p`` / ``c`` and normalised momentum embeddings ``m``.

        L = w_c·L_cent + w_n·L_nn + w_f·L_feat (0.5 each by default).
        """
        cfg = self.config
        k = cfg.n_neighbors
        m = [mi.detach().float() for mi in m]
        queries = [m[0], m[1] if cfg.nn_source == "momentum" else l2_normalize(z[1].detach().float())]
        current = current_ids = None
        if int(self.queue.filled) < k:  # first step of an empty queue only
            current = gather(m[0], with_grad=False)
            current_ids = gather(indices, with_grad=False)
        neighbours, ids = [], []
        for query in queries:
            values, value_ids = support_neighbours(
                query, self.queue, k, query_ids=indices, exclude_self=cfg.exclude_self,
                current=current, current_ids=current_ids,
            )
            neighbours.append(values)
            ids.append(value_ids)

        # Enc(S_1), Enc(S_2), Enc(T_1), Enc(T_2) in the official order (dropout masks)
        encoded = self.transformer.encode(neighbours, c, self.position_table)
        loss_centroid = centroid_loss(encoded[:2], encoded[2:], cfg.centroid_temperature)
        loss_nn = nnclr_loss(
            neighbours[0][:, 0], p[0], neighbours[1][:, 0], p[1], cfg.temperature, "cross_view"
        )
        loss_feature = self._feature_loss(m, z)
        loss = (
            cfg.centroid_weight * loss_centroid
            + cfg.nn_weight * loss_nn
            + cfg.feature_weight * loss_feature
        )
        # Pushed after the loss: the lookups above saw earlier steps only.
        self.queue.push(m[0], indices)
        return {
            "loss": loss,
            "loss_centroid": loss_centroid.detach(),
            "loss_nn": loss_nn.detach(),
            "loss_feature": loss_feature.detach(),
            **neighbour_metrics(ids[0][:, 0], indices, self.index_labels),
        }

    def _feature_loss(self, m: list[torch.Tensor], z: list[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        if cfg.feature_stats == "global":
            # Every process then computes the same loss over the global batch (as SimCLR does).
            m = [gather(mi, with_grad=False) for mi in m]
            z = [gather(zi, with_grad=True) for zi in z]
        if cfg.feature_loss == "rms":
            return feature_rms_loss(m[0], z[0], m[1], z[1], cfg.feature_scale)
        return feature_barlow_loss(m[0], z[0], m[1], z[1], cfg.barlow_lambda)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of backbone and projector, τ_m from 0.99 to 1.0 on a cosine over steps."""
        cfg = self.config
        momentum = momentum_at(
            cfg.momentum_base, cfg.momentum_final, step, total_steps, cfg.momentum_schedule
        )
        self.momentum_encoder.update(self._online(), momentum)
