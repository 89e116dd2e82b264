"""Transformer blocks shared by BERT, OPT and ViT: pre-LN or post-LN, with named points.

Layer ``i`` (module ``layer_i``) has the points::

    attn/...                 see qtx.nn.attention
    residual_attn            x + attention branch
    attn_ln/weight, /out     the attention LayerNorm (pre-LN: before the branch; post-LN: after
                             the sum)
    ffn/fc1/weight, ffn/hidden, ffn/act, ffn/fc2/weight, ffn/out
    residual_ffn             x + FFN branch
    ffn_ln/weight, /out      the FFN LayerNorm

Post-LN (BERT, RoBERTa, OPT-350m): ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``.
Pre-LN (OPT, ViT): ``x = x + Attn(LN(x)); x = x + FFN(LN(x))``.

With ``gamma_migrated`` (Outlier Suppression's gamma migration, see
``qtx.methods.outlier_suppression``) the LayerNorms are non-scaling and their gamma lives in
the weights that read them. Post-LN layers then also multiply the shortcut by it:
``x' = LN'(g_in * x + Attn(x))`` where ``g_in`` is the gamma of the LayerNorm that produced
``x``; the last layer's FFN LayerNorm feeds the model head and keeps its gamma.

With ``shortcut_affine`` (SmoothQuant / Outlier Suppression+ on a post-LN model, see
``qtx.methods.smoothquant``) every LayerNorm whose output feeds a residual shortcut (each
``attn_ln``, each ``ffn_ln`` but the last layer's, and the embedding LN of BERT) holds
``shortcut_scale`` / ``shortcut_shift`` (D,), and the shortcut reads ``y * shortcut_scale +
shortcut_shift`` (:func:`apply_shortcut`): smoothing the LN output ``y' = (y - z) / s`` then
gives the shortcut scale ``s`` and shift ``z``, and the model is unchanged. It cannot be
combined with gamma migration, nor (post-LN) with ``scan_layers``.

When a pooler reads the last post-LN layer (``run_layers(..., pooled=True)``), that layer's
``ffn_ln/out`` also has the rule name ``head_ln/out`` (:data:`HEAD_LN_ALIAS`): rules cannot
tell the last layer by its name, so a full-precision rule for ``head_ln/out`` ahead of the
rules for ``ffn_ln/out`` leaves the pooled LayerNorm output without a point (the Outlier
Suppression reference, whose pooler quantizes its own input; ``qtx.nn.layers.alias_removes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.attention import AttentionConfig, block_attention
from qtx.nn.decoder import DecoderLayer
from qtx.nn.layers import Dense, LayerNorm, alias_removes, drop_path
from qtx.quant import QuantPlan, QuantPoint
from qtx.quant.integer import as_float


def gelu_erf(x):
    """Exact GELU ``x/2 (1 + erf(x / sqrt 2))``, PyTorch's form. ``jax.nn.gelu``'s exact
    form goes through ``erfc``, which XLA:CPU evaluates about 5x slower than ``erf``; the
    two agree to float32 rounding (|difference| <= 1e-6 on |x| <= 10)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # the decoder family's SwiGLU (qtx.nn.decoder)
}
HEAD_LN_ALIAS = "head_ln/out"  # rule name of the last post-LN ffn_ln/out a pooler reads


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What one layer needs; built from the model config."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    pre_ln: bool
    activation: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    fused_qkv: bool = False
    use_bias: bool = True
    init_std: float = 0.02
    out_init_std: float | None = None
    attention: AttentionConfig = AttentionConfig()
    dtype: Any = jnp.float32
    causal: bool = False  # a decoder: position t sees positions <= t only
    attn_torch_init: str = ""  # attention projections ("qkvo" letters) with PyTorch's init
    gamma_migrated: bool = False  # non-scaling LayerNorms, gamma in the following weights
    shortcut_affine: bool = False  # post-LN shortcuts read y * shortcut_scale + shortcut_shift
    online_hadamard: bool = False  # Hadamard transform of the o_proj / down_proj inputs
    attention_kernel: str = "auto"  # see qtx.nn.attention.ATTENTION_KERNELS
    # the block (LAYERS): "transformer" (this module's) or "decoder" (qtx.nn.decoder, with
    # the fields below: GQA, head width, q/k norms, RMSNorm kind, biases)
    layer: str = "transformer"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool | None = None
    qk_norm: bool = False
    norm: str = "layernorm"
    mlp_bias: bool = False


class FFN(nn.Module):
    """``fc2(act(fc1(x)))`` (B, T, D) -> (B, T, D); points ``hidden``, ``act``, ``out``
    (``token_mask`` (B, T): their statistics see real tokens only)."""

    cfg: BlockConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, x, deterministic: bool = True, token_mask=None):
        c, p = self.cfg, self.plan
        init = nn.initializers.normal(c.init_std)
        out_init = nn.initializers.normal(c.out_init_std or c.init_std)
        h = Dense(c.intermediate_size, p, c.use_bias, init, c.dtype, name="fc1")(x)
        h = QuantPoint(p, name="hidden")(h, token_mask)
        h = QuantPoint(p, name="act", operand=True)(ACTIVATIONS[c.activation](h), token_mask)
        h = Dense(x.shape[-1], p, c.use_bias, out_init, c.dtype, name="fc2")(h)
        return QuantPoint(p, name="out")(h, token_mask)


class TransformerLayer(nn.Module):
    """One block ``x`` (B, T, D) -> (B, T, D); ``mask`` bool (B, 1, T, S), True = attend.

    ``shortcut_gamma``: how a post-LN model's shortcut reads ``x`` (:func:`apply_shortcut`):
    None, the migrated gamma (D,) of the LayerNorm that produced ``x`` (gamma migration) or
    its ``(shortcut_scale, shortcut_shift)`` (``shortcut_affine``). ``head_ln``: this layer's
    output LayerNorm feeds the model head (the last post-LN layer), so it keeps its gamma.
    ``pooled``: with ``head_ln``, a pooler reads that output, whose point then has the alias
    :data:`HEAD_LN_ALIAS`.
    """

    cfg: BlockConfig
    plan: QuantPlan = QuantPlan()
    head_ln: bool = False
    pooled: bool = False

    def setup(self):
        c, p = self.cfg, self.plan
        self.attn = block_attention(c, p)
        self.ffn = FFN(c, p)
        # both LayerNorms feed matmuls (the branch, or in post-LN the FFN / the next layer)
        affine = c.shortcut_affine and not c.pre_ln  # post-LN shortcuts read an affine LN output
        self.attn_ln = LayerNorm(
            p, c.ln_eps, non_scaling=c.gamma_migrated, operand=True, shortcut_affine=affine
        )
        self.ffn_ln = LayerNorm(
            p,
            c.ln_eps,
            non_scaling=self.output_ln_migrated,
            operand=True,
            alias=HEAD_LN_ALIAS if self.head_ln and self.pooled else None,
            shortcut_affine=affine and not self.head_ln,
        )
        self.residual_attn = QuantPoint(p)
        self.residual_ffn = QuantPoint(p)
        self.drop = nn.Dropout(c.dropout)

    @property
    def output_ln_migrated(self) -> bool:
        return self.cfg.gamma_migrated and (self.cfg.pre_ln or not self.head_ln)

    def output_gamma(self):
        """How the next post-LN layer's shortcut reads this output (:func:`apply_shortcut`):
        the migrated gamma, ``(shortcut_scale, shortcut_shift)`` or None."""
        if self.cfg.shortcut_affine and not (self.cfg.pre_ln or self.head_ln):
            return self.ffn_ln.shortcut()
        if self.cfg.pre_ln or not self.output_ln_migrated:
            return None
        return self.ffn_ln.migrated_gamma()

    def __call__(
        self,
        x,
        mask=None,
        token_mask=None,
        deterministic=True,
        shortcut_gamma=None,
        drop_rate=None,
    ):
        """``x``: float, or in an integer plan a QArray (a post-LN layer's input is the
        previous LayerNorm's output); returns the same kind. ``drop_rate`` overrides
        ``cfg.drop_path`` (a traced per-layer rate under ``nn.scan``)."""
        c = self.cfg
        rate = c.drop_path if drop_rate is None else drop_rate

        def branch(y):
            y = self.drop(y, deterministic=deterministic or c.dropout == 0)
            return drop_path(self, y, rate, deterministic)

        m = token_mask  # (B, T): the points' statistics see real tokens only
        if c.pre_ln:
            a = branch(self.attn(self.attn_ln(x, m), mask, m, deterministic))
            x = self.residual_attn(x + a, m)
            f = branch(self.ffn(self.ffn_ln(x, m), deterministic, m))
            return self.residual_ffn(x + f, m)
        a = branch(self.attn(x, mask, m, deterministic))
        shortcut = apply_shortcut(as_float(x), shortcut_gamma)
        xq = self.attn_ln(self.residual_attn(shortcut + a, m), m)
        f = branch(self.ffn(xq, deterministic, m))
        x = as_float(xq)
        if c.gamma_migrated:
            x = x * self.attn_ln.migrated_gamma()
        elif c.shortcut_affine:
            x = apply_shortcut(x, self.attn_ln.shortcut())
        return self.ffn_ln(self.residual_ffn(x + f, m), m)


def apply_shortcut(x, shortcut):
    """``x`` (..., D) float as a post-LN residual shortcut reads it: ``shortcut`` None (``x``),
    a (D,) factor ``g`` (gamma migration: ``g * x``) or a pair ``(scale, shift)``
    (``shortcut_affine``: ``x * scale + shift``)."""
    if shortcut is None:
        return x
    if isinstance(shortcut, tuple):
        return x * shortcut[0] + shortcut[1]
    return x * shortcut


def layer_class(cfg: BlockConfig) -> type[nn.Module]:
    """The block of ``cfg.layer``: the one place that picks it (:data:`LAYERS`)."""
    if cfg.layer not in LAYERS:
        raise UserError(f"block layer={cfg.layer!r} is invalid; allowed: {', '.join(LAYERS)}.")
    return LAYERS[cfg.layer]


LAYERS = {"transformer": TransformerLayer, "decoder": DecoderLayer}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(
    cfg: BlockConfig,
    plan: QuantPlan,
    num_layers: int,
    x,
    mask=None,
    token_mask=None,
    deterministic=True,
    remat=False,
    collect=False,
    shortcut_gamma=None,
    linear_drop_path=False,
    scan=False,
    remat_policy="full",
    pooled=False,
    rope=None,
):
    """Runs ``layer_0 .. layer_{n-1}`` inside the calling module's compact method, so the
    layers are named at the model's top level (``layer_3/attn/softmax``).

    ``shortcut_gamma``: how the first layer's shortcut reads ``x`` (post-LN models under
    gamma migration or ``shortcut_affine``, see :func:`apply_shortcut`), else None. Returns
    the final hidden states and, if ``collect``, the ``num_layers + 1`` layer inputs and
    outputs (as HF's ``hidden_states``; with gamma migration or ``shortcut_affine`` they are
    reported as the shortcut reads them, i.e. as the original model's).
    ``linear_drop_path``: layer i drops its branches with rate ``cfg.drop_path * i / (L - 1)``
    (DeiT / timm's stochastic depth) instead of ``cfg.drop_path`` everywhere.
    ``remat``: recompute each layer's activations in the backward pass, saving what
    ``remat_policy`` (:data:`REMAT_POLICIES`) allows. ``scan``: one ``nn.scan`` over a
    single layer named ``layers`` whose variables carry a leading layer axis (compiled once,
    whatever the depth); :class:`qtx.models.scan.ScannedModel` shows them as ``layer_i``.
    In an integer plan ``x`` and the result may be QArrays (post-LN); ``states`` are float.
    ``pooled``: a pooler reads the result (see :class:`TransformerLayer`).
    ``cfg.layer`` picks the block (:data:`LAYERS`); ``rope``: the decoder's rotary tables
    ``(cos, sin)`` (B, T, R), handed to every layer.
    """
    if scan:
        name = f"layer_{num_layers - 1}/ffn_ln/out"
        if pooled and not cfg.pre_ln and alias_removes(plan, name, HEAD_LN_ALIAS):
            raise UserError(
                "config.model.scan_layers=True gives every layer the same points, but the "
                f"quantization rules leave '{name}' (rule name '{HEAD_LN_ALIAS}') in full "
                "precision; set scan_layers=False or quantize it (os_fastertransformer "
                "option head_points='all')."
            )
        return _scan_layers(
            cfg, plan, num_layers, x, mask, token_mask, deterministic, remat, collect,
            linear_drop_path, remat_policy, rope,
        )  # fmt: skip
    layer_cls = layer_class(cfg)
    if remat:
        layer_cls = nn.remat(layer_cls, static_argnums=(4,), policy=REMAT_POLICIES[remat_policy])
    extra = () if rope is None else (None, rope)  # drop_rate, rope (decoder layers)
    states = [apply_shortcut(as_float(x), shortcut_gamma)]
    for i in range(num_layers):
        head_ln = not cfg.pre_ln and i == num_layers - 1
        layer_cfg = cfg
        if linear_drop_path:
            rate = cfg.drop_path * i / max(num_layers - 1, 1)
            layer_cfg = dataclasses.replace(cfg, drop_path=rate)
        layer = layer_cls(layer_cfg, plan, head_ln, head_ln and pooled, name=f"layer_{i}")
        x = layer(x, mask, token_mask, deterministic, shortcut_gamma, *extra)
        shortcut_gamma = layer.output_gamma()
        states.append(apply_shortcut(as_float(x), shortcut_gamma))
    return x, (tuple(states) if collect else None)


class _ScanStep(nn.Module):
    """One layer as a scan step: ``(x, (mask, token_mask[, rope]), rate) -> (x, x or None)``."""

    cfg: BlockConfig
    plan: QuantPlan
    deterministic: bool
    collect: bool

    @nn.compact
    def __call__(self, x, masks, rate):
        layer = layer_class(self.cfg)(self.cfg, self.plan, name="layer")
        x = layer(x, masks[0], masks[1], self.deterministic, None, rate, *masks[2:])
        return x, (x if self.collect else None)


def _scan_layers(
    cfg, plan, num_layers, x, mask, token_mask, deterministic, remat, collect, linear, policy, rope
):
    """``run_layers`` under ``nn.scan``: variables (L, ...) under ``layers/layer``."""
    if plan.integer:
        raise UserError(
            "config.model.scan_layers=True runs training; integer models need scan_layers=False."
        )
    step_cls = _ScanStep
    if remat:
        step_cls = nn.remat(_ScanStep, prevent_cse=False, policy=REMAT_POLICIES[policy])
    scanned = nn.scan(
        step_cls,
        variable_axes={True: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),
        length=num_layers,
    )
    masks = (mask, token_mask) if rope is None else (mask, token_mask, rope)
    rates = None  # per-layer stochastic depth rates (L,), when they differ between layers
    if linear and cfg.drop_path > 0:
        rates = cfg.drop_path * jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
    y, ys = scanned(cfg, plan, deterministic, collect, name="layers")(x, masks, rates)
    if not collect:
        return y, None
    return y, (as_float(x), *(ys[i] for i in range(num_layers)))
