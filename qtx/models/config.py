"""Model configuration shared by all families (frozen, hashable: it is static for jit)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from qtx.errors import UserError
from qtx.models.family import family_record
from qtx.nn.attention import ATTENTION_KERNELS, FINETUNE_GATE_STD, AttentionConfig
from qtx.nn.transformer import ACTIVATIONS, REMAT_POLICIES, BlockConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Attention projections that take PyTorch's default Linear init instead of N(0, init_std): the
# reference code builds its attention modules after the model, so they keep that init.
ATTENTION_PROJ_INITS = {"normal": "", "pytorch_qkv": "qkv", "pytorch_qkvo": "qkvo"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Field errors name ``config.model.<field>``."""

    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    pre_ln: bool = False
    final_ln: bool = False
    activation: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    drop_path: float = 0.0
    fused_qkv: bool = False
    use_bias: bool = True
    init_std: float = 0.02
    attention_proj_init: str = "normal"
    attention: AttentionConfig = AttentionConfig()
    pad_token_id: int = 0
    position_offset: int = 0
    word_embed_proj_dim: int | None = None
    head: str = "mlm"
    num_labels: int = 2
    pooler: bool = True
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    distillation_token: bool = False
    # Swin: blocks and heads per stage (stage s has width hidden_size * 2**s and FFN width
    # intermediate_size * 2**s); num_layers and num_heads are then sum(depths) and heads[0]
    depths: tuple[int, ...] = ()
    stage_heads: tuple[int, ...] = ()
    window_size: int = 7
    dtype: str = "float32"
    remat: bool = False  # recompute layer activations in the backward pass
    remat_policy: str = "full"  # what remat keeps: see qtx.nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the layers: compile time independent of depth
    attention_kernel: str = "auto"  # see qtx.nn.attention.ATTENTION_KERNELS
    # Outlier Suppression's gamma migration was applied to the parameters: the LayerNorms are
    # non-scaling (set by qtx.methods.outlier_suppression.migrate_gamma, never by hand)
    gamma_migrated: bool = False
    # SmoothQuant / Outlier Suppression+ on a post-LN model (qtx.methods.smoothquant): every
    # LayerNorm that feeds a residual shortcut holds ``shortcut_scale`` / ``shortcut_shift``
    # (D,) and the shortcut reads ``y * shortcut_scale + shortcut_shift`` (set by the methods)
    shortcut_affine: bool = False
    # Hadamard rotations (qtx.methods.quarot): the residual stream is rotated (exact) and the
    # o_proj / down_proj inputs get an online Hadamard transform (set by the method)
    rotated: bool = False
    rotation_seed: int = 0  # the random residual rotation's seed (params_for reproduces it)
    # Decoders (families with ``decoder_fields``, qtx.models.llama): grouped-query attention,
    # head width, rotary positions, RMSNorm kind, q/k norms, biases and the LM head's tie
    num_kv_heads: int | None = None  # key/value heads (None: num_heads)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # rotate the first head_dim * factor dims (even)
    # Llama-3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos)
    rope_scaling: tuple | None = None
    norm: str = "layernorm"  # qtx.nn.norms.NORMS; decoders: rmsnorm, rmsnorm_zero_centered
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Qwen3.5)
    qkv_bias: bool = False  # biases on q/k/v (Qwen2); use_bias is o_proj's
    mlp_bias: bool = False  # biases on gate/up/down projections
    tie_embeddings: bool = True  # the LM head reads the word embedding table

    def __post_init__(self):
        def bad(field, allowed):
            raise UserError(
                f"config.model.{field}={getattr(self, field)!r} is invalid; allowed: {allowed}."
            )

        family = family_record(self.family)
        if family.check is not None:
            family.check(self, bad)
        if self.head not in family.heads:
            bad("head", ", ".join(family.heads) + f" for family {self.family!r}")
        if self.activation not in ACTIVATIONS:
            bad("activation", ", ".join(ACTIVATIONS))
        if self.dtype not in DTYPES:
            bad("dtype", ", ".join(DTYPES))
        if self.attention_proj_init not in ATTENTION_PROJ_INITS:
            bad("attention_proj_init", ", ".join(ATTENTION_PROJ_INITS))
        for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if int(getattr(self, f)) < 1:
                bad(f, "a positive integer")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("num_heads", f"a divisor of hidden_size={self.hidden_size}")
        if not family.decoder_fields:
            for f, default in DECODER_DEFAULTS.items():
                if getattr(self, f) != default:
                    bad(f, f"{default!r} for family {self.family!r} (a decoder field)")
        for f in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, f) < 1.0:
                bad(f, "a number in [0, 1)")
        if not family.images and self.vocab_size < 1:
            bad("vocab_size", "a positive integer")
        if family.images and self.image_size % self.patch_size:
            bad("image_size", f"a multiple of patch_size={self.patch_size}")

        if self.num_labels < 1:
            bad("num_labels", "a positive integer")
        if self.attention_kernel not in ATTENTION_KERNELS:
            bad("attention_kernel", ", ".join(ATTENTION_KERNELS))
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", ", ".join(REMAT_POLICIES))
        if self.scan_layers and family.no_scan:
            bad("scan_layers", f"False for family {self.family!r} ({family.no_scan})")
        if self.rotated and not family.decoder_fields:
            bad("rotated", f"False for family {self.family!r} (rotations need an RMSNorm decoder)")
        if self.scan_layers and self.gamma_migrated:
            bad("scan_layers", "False with gamma migration (each layer's shortcut differs)")
        if self.shortcut_affine and self.gamma_migrated:
            bad("shortcut_affine", "False with gamma_migrated=True (both rewrite the shortcut)")
        if self.scan_layers and self.shortcut_affine and not self.pre_ln:
            bad("scan_layers", "False with shortcut_affine=True (each layer's shortcut differs)")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def attention_head_dim(self) -> int:
        """Width of one attention head: ``head_dim``, or ``hidden_size // num_heads``."""
        return self.head_dim or self.hidden_size // max(self.num_heads, 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block(self, **overrides) -> BlockConfig:
        attention, family = self.attention, family_record(self.family)
        if attention.gate_finetune and attention.gate_init_std is None:
            std = family.finetune_gate_std
            std = FINETUNE_GATE_STD if std is None else std
            attention = dataclasses.replace(attention, gate_init_std=std)
        return BlockConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            pre_ln=self.pre_ln,
            activation=self.activation,
            ln_eps=self.ln_eps,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path=self.drop_path,
            fused_qkv=self.fused_qkv,
            use_bias=self.use_bias,
            init_std=self.init_std,
            attention=attention,
            dtype=self.compute_dtype,
            causal=family.causal,
            attn_torch_init=ATTENTION_PROJ_INITS[self.attention_proj_init],
            gamma_migrated=self.gamma_migrated,
            shortcut_affine=self.shortcut_affine,
            online_hadamard=self.rotated,
            attention_kernel=self.attention_kernel,
            layer="decoder" if family.decoder_fields else "transformer",
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias if family.decoder_fields else None,
            qk_norm=self.qk_norm,
            norm=self.norm,
            mlp_bias=self.mlp_bias,
            **overrides,
        )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# decoder-only fields (families with ``decoder_fields``) and their defaults, which every other
# family must keep
DECODER_FIELDS = (
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "partial_rotary_factor",
    "rope_scaling",
    "norm",
    "qk_norm",
    "qkv_bias",
    "mlp_bias",
    "tie_embeddings",
)
DECODER_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in DECODER_FIELDS
}


def model_config_from_dict(d: Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Applies a mapping of overrides (``attention`` may be a nested mapping) to ``base``."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"config.model has unknown field(s) {unknown}; allowed: {sorted(names)}.")
    base = base or ModelConfig()
    att = d.pop("attention", None)
    if att is not None and not isinstance(att, AttentionConfig):
        att = dict(att)
        a_names = {f.name for f in dataclasses.fields(AttentionConfig)}
        a_unknown = sorted(set(att) - a_names)
        if a_unknown:
            raise UserError(
                f"config.model.attention has unknown field(s) {a_unknown}; allowed: "
                f"{sorted(a_names)}."
            )
        att = dataclasses.replace(base.attention, **att)
    if att is not None:
        d["attention"] = att
    return dataclasses.replace(base, **d)
