"""Which normalisation feeds which linear kernels, and the exact rewrites of such a group.

SmoothQuant and Outlier Suppression+ (docs/methods.md §5) move a per-channel shift ``z`` and scale
``s`` (D,) out of a normalisation's output ``y`` (B, T, D) into the layers that read it:
``y' = (y - z) / s`` and, for every consumer ``x W + b`` (kernel (D, out)),
``W' = diag(s) W``, ``b' = b + z W``, so ``y' W' + b' = y W + b`` exactly.

The map (:func:`norm_groups`), paths without ``"params"``:

* post-LN (BERT, RoBERTa, OPT-350m): ``embed/ln`` (BERT / RoBERTa) -> layer 0's q/k/v (and
  attention gate kernels) and layer 0's attention shortcut; ``layer_i/attn_ln`` -> its
  ``ffn/fc1`` and FFN shortcut; ``layer_i/ffn_ln`` -> layer i+1's q/k/v (and gate) and
  attention shortcut. The last ``ffn_ln`` feeds the head and is left alone. A shortcut reads
  ``y * shortcut_scale + shortcut_shift`` (``ModelConfig.shortcut_affine``, see
  ``qtx.nn.transformer``), which takes ``s`` and ``z``: ``y' * s + z = y``.
* pre-LN (OPT, ViT): ``attn_ln`` -> q/k/v (and gate), ``ffn_ln`` -> ``fc1``; no shortcut.
* llama family (RMSNorm, no bias): ``attn_ln`` -> q/k/v (and the output gate's kernel),
  ``ffn_ln`` -> ``gate_proj`` / ``up_proj``. A normalisation without bias, or a group with a
  consumer without bias, cannot take a shift (only ``s``).

The normalisation takes ``gamma / s`` and ``(beta - z) / s`` (LayerNorm), ``w / s``
(RMSNorm) or ``(1 + w) / s - 1`` (zero-centred RMSNorm ``x̂ (1 + w)``). Per-head gate kernels
(H, Dh[, k]) read ``y`` split into heads; they are scaled per head slice and, for search
errors, seen as their block-diagonal (D, H[*k]) equivalent (:func:`consumer_matrix`).

:func:`fake_quant` / :func:`group_errors` measure a group's quantized output error with the
setup's own quantizers (SmoothQuant's alpha search, OS+'s range search).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.models import ModelConfig
from qtx.models.family import family_record
from qtx.quant.estimators import estimate
from qtx.quant.ranges import fake_quant_range, from_view, make_view, reduce, to_view

# (kernel, bias) suffixes under layer_i that read the attention input (B, T, D): Dense
# kernels (D, out), the all-heads / output gate's Dense, per-head gate kernels (H, Dh[, k])
ATTENTION_INPUTS = (
    (("attn", "q_proj", "kernel"), ("attn", "q_proj", "bias")),
    (("attn", "k_proj", "kernel"), ("attn", "k_proj", "bias")),
    (("attn", "v_proj", "kernel"), ("attn", "v_proj", "bias")),
    (("attn", "qkv_proj", "kernel"), ("attn", "qkv_proj", "bias")),
    (("attn", "gate", "dense", "kernel"), ("attn", "gate", "dense", "bias")),
    (("attn", "gate", "kernel"), ("attn", "gate", "bias")),
    (("attn", "gate", "hidden_kernel"), ("attn", "gate", "hidden_bias")),
)
FFN_INPUTS = (
    (("ffn", "fc1", "kernel"), ("ffn", "fc1", "bias")),
    (("ffn", "gate_proj", "kernel"), ("ffn", "gate_proj", "bias")),
    (("ffn", "up_proj", "kernel"), ("ffn", "up_proj", "bias")),
)
SUPPORTED = ("bert", "roberta", "opt", "vit", "llama")
FALLBACK_ACT = quant.QuantSpec(bits=8, scheme="symmetric", estimator="minmax")
FALLBACK_WEIGHT = quant.QuantSpec(
    bits=8, scheme="symmetric", granularity="channel", estimator="current_minmax"
)


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A kernel that reads a normalisation's output: ``kernel`` / ``bias`` parameter paths
    (``bias`` None: it has none), ``per_head`` (a (H, Dh[, k]) gate kernel, no Dense) and
    ``dense`` (its Dense module path, e.g. ``layer_0/attn/q_proj``, or None)."""

    kernel: tuple[str, ...]
    bias: tuple[str, ...] | None
    per_head: bool

    @property
    def dense(self) -> str | None:
        return None if self.per_head else "/".join(self.kernel[:-1])

    @property
    def weight_point(self) -> str | None:
        """The quantization point of the kernel (per-head gate kernels have none)."""
        return None if self.per_head else self.dense + "/weight"


@dataclasses.dataclass(frozen=True)
class NormGroup:
    """A normalisation (``norm`` path, ``kind`` in ``layernorm`` / ``rmsnorm`` /
    ``rmsnorm_zero_centered``), its consumers, and whether its output also feeds a residual
    shortcut (post-LN) and can take a shift (a LayerNorm whose consumers all have biases)."""

    norm: tuple[str, ...]
    kind: str
    consumers: tuple[Consumer, ...]
    shortcut: bool
    shiftable: bool

    @property
    def name(self) -> str:
        return "/".join(self.norm)

    @property
    def point(self) -> str:
        """The normalisation's output point (the consumers' activation quantizer)."""
        return self.name + "/out"

    @property
    def reader(self) -> str:
        """A Dense consumer whose input capture statistics record (all read the same ``y``)."""
        return next(c.dense for c in self.consumers if c.dense is not None)


def check_supported(cfg: ModelConfig, method: str) -> None:
    """Refuses (UserError) models the map does not cover, gamma-migrated models and post-LN
    models with scanned layers; ``method`` names the caller in the message."""
    if cfg.family not in SUPPORTED:
        names = ", ".join(SUPPORTED)
        raise UserError(
            f"{method} rewrites the normalisations of {names} models; config.model.family="
            f"{cfg.family!r} is not supported (allowed: {names})."
        )
    if cfg.gamma_migrated:
        raise UserError(
            f"{method} cannot be applied to a gamma-migrated model (config.model."
            "gamma_migrated=True); allowed: gamma_migrated=False."
        )
    if not cfg.pre_ln and cfg.scan_layers:
        raise UserError(
            f"{method} gives a post-LN model per-layer shortcut parameters (shortcut_affine), "
            "which scanned layers cannot hold; allowed: config.model.scan_layers=False."
        )


def norm_groups(cfg: ModelConfig, params) -> list[NormGroup]:
    """The model's ``[NormGroup, ...]`` (see the module docstring), checked against
    ``params`` (the plain parameter tree): consumers absent from it are dropped."""
    flat = flatten_dict(unfreeze(params))
    kind = cfg.norm

    def consumers(i: int, table) -> tuple[Consumer, ...]:
        out = []
        for kernel, bias in table:
            k, b = (f"layer_{i}",) + kernel, (f"layer_{i}",) + bias
            if k in flat:
                per_head = kernel[-2] == "gate" and kernel[-1] != "dense"
                out.append(Consumer(k, b if b in flat else None, per_head))
        return tuple(out)

    def group(norm, cons, shortcut):
        if norm + ("scale",) not in flat:
            raise UserError(
                f"parameters have no normalisation '{'/'.join(norm)}' (the {cfg.family} model "
                "config expects one); allowed: parameters of the same model config."
            )
        if not any(c.dense for c in cons):
            raise UserError(
                f"normalisation '{'/'.join(norm)}' has no linear consumer in the parameters; "
                "allowed: parameters of the same model config."
            )
        shiftable = norm + ("bias",) in flat and all(c.bias is not None for c in cons)
        return NormGroup(norm, kind, cons, shortcut, shiftable)

    n = cfg.num_layers
    out = []
    if cfg.pre_ln:
        for i in range(n):
            out.append(group((f"layer_{i}", "attn_ln"), consumers(i, ATTENTION_INPUTS), False))
            out.append(group((f"layer_{i}", "ffn_ln"), consumers(i, FFN_INPUTS), False))
        return out
    if family_record(cfg.family).migrate_embed_ln:
        out.append(group(("embed", "ln"), consumers(0, ATTENTION_INPUTS), True))
    for i in range(n):
        out.append(group((f"layer_{i}", "attn_ln"), consumers(i, FFN_INPUTS), True))
        if i < n - 1:
            out.append(group((f"layer_{i}", "ffn_ln"), consumers(i + 1, ATTENTION_INPUTS), True))
    return out


def prepare(cfg: ModelConfig, params, method: str):
    """``(cfg', flat params, groups)`` ready for :func:`smooth_group`: checks the model
    (:func:`check_supported`), and for a post-LN model turns ``shortcut_affine`` on (adding
    the identity shortcut parameters; a model that has them already keeps them)."""
    check_supported(cfg, method)
    groups = norm_groups(cfg, params)
    flat = flat_params(params)
    if any(g.shortcut for g in groups):
        add_shortcut_params(flat, groups)
        cfg = cfg.replace(shortcut_affine=True)
    return cfg, flat, groups


def smoothed_config(cfg: ModelConfig) -> ModelConfig:
    """The config a smoothing gives ``cfg`` (no compute): post-LN models get
    ``shortcut_affine``; pre-LN and decoder models are unchanged (an ordinary checkpoint)."""
    return cfg if cfg.pre_ln else cfg.replace(shortcut_affine=True)


def flat_params(params) -> dict:
    """``params`` as a flat ``{path tuple: array}`` dict (a copy)."""
    return dict(flatten_dict(unfreeze(params)))


def nested_params(flat: Mapping) -> dict:
    return unflatten_dict(dict(flat))


def add_shortcut_params(flat: dict, groups: Sequence[NormGroup]) -> dict:
    """Adds ``shortcut_scale`` (ones) / ``shortcut_shift`` (zeros) to every shortcut norm
    that has none yet (a model switched to ``shortcut_affine``); ``flat`` is changed."""
    for g in groups:
        if g.shortcut and g.norm + ("shortcut_scale",) not in flat:
            d = np.shape(flat[g.norm + ("scale",)])[0]
            flat[g.norm + ("shortcut_scale",)] = jnp.ones((d,), jnp.float32)
            flat[g.norm + ("shortcut_shift",)] = jnp.zeros((d,), jnp.float32)
    return flat


def _per_head(v, kernel):
    """``v`` (D,) shaped to broadcast against a per-head kernel (H, Dh[, k])."""
    vh = v.reshape(kernel.shape[0], kernel.shape[1]).astype(kernel.dtype)
    return vh if kernel.ndim == 2 else vh[..., None]


def scale_rows(kernel, s):
    """``diag(s) W``: ``kernel`` (D, out) or per-head (H, Dh[, k]) with its input axis times
    ``s`` (D,)."""
    kernel = jnp.asarray(kernel)
    s = jnp.asarray(s, jnp.float32)
    if kernel.ndim == 2 and kernel.shape[0] == s.shape[0]:
        return kernel * s[:, None].astype(kernel.dtype)
    return kernel * _per_head(s, kernel)


def shifted_bias(bias, kernel, z):
    """``b + z W`` for ``kernel`` (D, out) (bias (out,)) or per-head (H, Dh) (bias (H,)) /
    (H, Dh, k) (bias (H, k))."""
    kernel = jnp.asarray(kernel, jnp.float32)
    z = jnp.asarray(z, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if kernel.ndim == 2 and kernel.shape[0] == z.shape[0]:
        add = jnp.dot(z, kernel, precision=hi)
    else:
        zh = z.reshape(kernel.shape[0], kernel.shape[1])
        sub = "hd,hd->h" if kernel.ndim == 2 else "hd,hdk->hk"
        add = jnp.einsum(sub, zh, kernel, precision=hi)
    return jnp.asarray(bias, jnp.float32) + add


def smooth_group(flat: dict, g: NormGroup, s, z=None) -> dict:
    """Rewrites one group in ``flat`` (changed and returned) so its output becomes
    ``y' = (y - z) / s`` with the model unchanged: consumers ``diag(s) W`` and ``b + z W``,
    the normalisation ``gamma / s``, ``(beta - z) / s`` (RMSNorm: ``w / s`` or ``(1 + w) / s
    - 1``), a shortcut ``scale * s`` and ``shift + z * scale``. ``z`` None: scale only."""
    s = jnp.asarray(s, jnp.float32)
    if z is not None and not g.shiftable:
        raise ValueError(f"normalisation '{g.name}' cannot take a shift (no bias)")
    for c in g.consumers:
        kernel = flat[c.kernel]
        if z is not None:
            flat[c.bias] = shifted_bias(flat[c.bias], kernel, z)
        flat[c.kernel] = scale_rows(kernel, s)
    w = jnp.asarray(flat[g.norm + ("scale",)], jnp.float32)
    if g.kind == "rmsnorm_zero_centered":
        flat[g.norm + ("scale",)] = (1.0 + w) / s - 1.0
    else:
        flat[g.norm + ("scale",)] = w / s
    if g.norm + ("bias",) in flat:
        b = jnp.asarray(flat[g.norm + ("bias",)], jnp.float32)
        flat[g.norm + ("bias",)] = (b if z is None else b - z) / s
    if g.shortcut:
        a = jnp.asarray(flat[g.norm + ("shortcut_scale",)], jnp.float32)
        if z is not None:
            c0 = jnp.asarray(flat[g.norm + ("shortcut_shift",)], jnp.float32)
            flat[g.norm + ("shortcut_shift",)] = c0 + z * a
        flat[g.norm + ("shortcut_scale",)] = a * s
    return flat


def consumer_matrix(flat: Mapping, c: Consumer) -> jax.Array:
    """The (D, out) float32 matrix of consumer ``c``: a Dense kernel itself, a per-head
    (H, Dh) gate kernel as block-diagonal (H*Dh, H), (H, Dh, k) as (H*Dh, H*k)."""
    kernel = jnp.asarray(flat[c.kernel], jnp.float32)
    if not c.per_head:
        return kernel
    h, dh = kernel.shape[:2]
    k = 1 if kernel.ndim == 2 else kernel.shape[2]
    eye = jnp.eye(h, dtype=jnp.float32)
    return jnp.einsum("hdk,hg->hdgk", kernel.reshape(h, dh, k), eye).reshape(h * dh, h * k)


def weight_absmax(flat: Mapping, g: NormGroup) -> np.ndarray:
    """(D,) ``max_k |W_{j,k}|`` over all consumers of ``g`` (the fused weight's row max)."""
    rows = [jnp.max(jnp.abs(consumer_matrix(flat, c)), axis=1) for c in g.consumers]
    return np.asarray(jnp.max(jnp.stack(rows), axis=0))


def group_specs(plan: quant.QuantPlan | None, g: NormGroup):
    """``(act spec, (weight spec or None per consumer))`` of a group under ``plan``: the
    norm output point's spec and each consumer's weight point spec. An unquantized output
    point falls back to 8-bit per-tensor symmetric (:data:`FALLBACK_ACT`), an unquantized
    Dense weight to 8-bit per-channel symmetric (:data:`FALLBACK_WEIGHT`); per-head gate
    kernels have no weight point (None: full precision)."""

    def resolve(name, kind):
        if plan is None:
            return None
        spec, mode = plan.resolve(name, kind)
        return None if mode == "off" else spec

    act = resolve(g.point, "act") or FALLBACK_ACT
    weights = tuple(
        None if c.per_head else (resolve(c.weight_point, "weight") or FALLBACK_WEIGHT)
        for c in g.consumers
    )
    return act, weights


def fake_quant(x, spec: quant.QuantSpec | None, kind: str):
    """``x`` (n, D) activation rows or a (D, out) kernel fake-quantized as ``spec`` would
    quantize it at its point (rows seen as the point's (1, n, D) tensor, channel axis -1; the
    range estimated on ``x`` itself, as a calibration over this sample would). None: ``x``
    unchanged."""
    if spec is None:
        return x
    shape = x.shape
    x = x.astype(jnp.float32)
    if kind == "act":
        x = x[None]  # (B=1, T=n, D): the point's layout (token specs name their axis in it)
    view = make_view(x.shape, spec, -1, None, kind)
    if spec.binary:  # sign(x) mean|x| (per token for per-tensor activations)
        if kind == "act" and spec.granularity == "tensor":
            token = dataclasses.replace(spec, granularity="token", axis=None)
            view = make_view(x.shape, token, -1)
        xv = to_view(x, view)
        alpha = reduce(jnp.mean, jnp.abs(xv), view)
        return from_view(jnp.where(xv >= 0, alpha, -alpha), view).reshape(shape)
    xv = to_view(x, view)
    lo, hi = estimate(xv, view, spec)
    return from_view(fake_quant_range(xv, lo, hi, spec), view).reshape(shape)


def group_errors(rows, mats, specs, scales, z=None) -> np.ndarray:
    """(K,) quantized output errors of a group for K candidate scales ``scales`` (K, D):
    ``sum_c ||Q_a((X - z) / s) Q_w(diag(s) W_c) - (X - z) W_c||^2`` over the consumers'
    matrices ``mats`` ((D, out_c), :func:`consumer_matrix`), ``X`` = ``rows`` (n, D).
    ``specs``: :func:`group_specs`. ``z`` None: no shift."""
    x = jnp.asarray(rows, jnp.float32)
    if z is not None:
        x = x - jnp.asarray(z, jnp.float32)
    return np.asarray(_errors(x, tuple(mats), jnp.asarray(scales, jnp.float32), specs))


@functools.partial(jax.jit, static_argnums=(3,))
def _errors(x, mats, scales, specs):
    act, weights = specs
    hi = jax.lax.Precision.HIGHEST
    refs = [jnp.dot(x, w, precision=hi) for w in mats]

    def one(s):
        xq = fake_quant(x / s, act, "act")
        total = jnp.zeros((), jnp.float32)
        for w, ref, spec in zip(mats, refs, weights, strict=True):
            wq = fake_quant(w * s[:, None], spec, "weight")
            total = total + jnp.sum(jnp.square(jnp.dot(xq, wq, precision=hi) - ref))
        return total

    return jax.lax.map(one, scales)


def real_stats(table: Mapping, g: NormGroup) -> np.ndarray:
    """The statistic of ``g``'s output from a :func:`qtx.methods.capture.dense_inputs`
    table (keyed by Dense path)."""
    if g.reader not in table:
        raise UserError(
            f"the calibration batches gave no statistics at '{g.reader}' (the input of "
            f"'{g.name}'); allowed: batches with at least one real token."
        )
    stat = np.asarray(table[g.reader], np.float32)
    if stat.size == 0 or not np.all(np.isfinite(stat)):  # no real token reached it
        raise UserError(
            f"the calibration batches gave no finite statistics at '{g.reader}' (the input "
            f"of '{g.name}'); allowed: batches with at least one real token and finite "
            "activations."
        )
    return stat
