"""QuaRot's rotations of a pre-RMSNorm decoder by computational invariance (docs/methods.md §5).

For the ``llama`` family (Llama, Mistral, Qwen2/3/3.5 shapes), in float64, exact:

1. every RMSNorm gain ``g`` (``w``, or ``1 + w`` for ``rmsnorm_zero_centered``) moves into the
   rows of the kernels that read the norm: attention norm -> q/k/v (and the output gate /
   ``all_heads_linear`` gate ``gate/dense``), FFN norm -> gate_proj / up_proj, final norm ->
   the LM head (a tied head becomes an untied kernel ``diag(g) E^T``); the norm's weight
   becomes the identity (1, or 0 zero-centred);
2. the residual stream is rotated by ``Q = diag(s) (I ⊗ H_b)`` (``qtx.nn.hadamard.
   random_hadamard``, signs from ``rotation_seed``): the embedding ``E' = E Q``, every kernel
   reading the residual ``W' = Q^T W``, every kernel writing it (o_proj, down_proj) ``W' = W Q``
   with bias ``b' = b Q``. A unit-gain RMSNorm commutes with ``Q`` (``|x Q| = |x|``);
3. the online Hadamard ``H`` of the o_proj input (width H·Dh) and of the down_proj input
   (width F), which a rotated model applies (``ModelConfig.rotated``), is undone in those
   kernels' rows: ``W' = H^T W``.

Refused: post-LN or LayerNorm families (the mean subtraction of LayerNorm and the post-LN
residual do not commute with a rotation), an already rotated config, per-head gates that read
slices of the normalised residual (``linear``, ``mlp``, ``mlp_wide``), models without the LM
head (the final norm's gain has nowhere to go).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.methods.kinds import Reparametrisation, Transform
from qtx.models import ModelConfig
from qtx.models.family import family_record
from qtx.nn.hadamard import hadamard_numpy, hadamard_order, random_signs

PAPER = "QuaRot (Ashkboos et al., NeurIPS 2024; docs/methods.md §5)"
OPTION_FIELDS = ("rotation_seed",)
# kernels (D, out) that read a layer's attention norm / FFN norm
ATTENTION_READERS = (
    ("attn", "q_proj", "kernel"),
    ("attn", "k_proj", "kernel"),
    ("attn", "v_proj", "kernel"),
    ("attn", "qkv_proj", "kernel"),
    ("attn", "gate", "dense", "kernel"),
)
FFN_READERS = (("ffn", "gate_proj", "kernel"), ("ffn", "up_proj", "kernel"))
WRITERS = (("attn", "o_proj"), ("ffn", "down_proj"))  # (in, D) kernels, their inputs online
SLICED_GATES = ("linear", "mlp", "mlp_wide")  # read each head's slice of the residual


def check_rotatable(cfg: ModelConfig) -> None:
    """Raises UserError when ``cfg``'s model has no exact rotation."""
    if not family_record(cfg.family).decoder_fields:
        why = (
            "its LayerNorm subtracts the mean, which a rotated residual stream does not keep"
            if cfg.pre_ln
            else "it is post-LN, so the residual stream passes through the LayerNorm"
        )
        raise UserError(
            f"rotation needs a pre-RMSNorm decoder (family 'llama'), not family "
            f"{cfg.family!r}: {why}."
        )
    if cfg.rotated:
        raise UserError(
            "rotation was already applied to this model (config.model.rotated=True); allowed: "
            "rotating the original parameters once."
        )
    a = cfg.attention
    if a.gate in SLICED_GATES and a.gate_condition != "none":
        raise UserError(
            f"rotation cannot rewrite config.model.attention.gate={a.gate!r}: it reads each "
            "head's slice of the normalised residual, which the rotation mixes; allowed: none, "
            "all_heads_linear, headwise, elementwise."
        )
    if cfg.head != "clm":
        raise UserError(
            f"rotation needs config.model.head='clm' (got {cfg.head!r}): the final norm's gain "
            "moves into the LM head."
        )
    if cfg.shortcut_affine:
        raise UserError(
            "rotation cannot follow a post-LN shortcut rewrite (config.model.shortcut_affine="
            "True); allowed: shortcut_affine=False."
        )


def _gain(cfg: ModelConfig, w) -> tuple[np.ndarray, np.ndarray]:
    """``(gain, identity weight)`` of an RMSNorm weight ``w`` of ``cfg.norm``."""
    w = np.asarray(w, np.float64)
    if cfg.norm == "rmsnorm_zero_centered":
        return 1.0 + w, np.zeros_like(w)
    return w, np.ones_like(w)


def rotate(cfg: ModelConfig, params, seed: int) -> tuple[ModelConfig, dict, dict]:
    """``(cfg', params', info)``: ``params`` (no "params" wrapper) of ``cfg`` rotated with
    ``seed``; ``cfg'`` has ``rotated=True``, ``rotation_seed=seed``, ``tie_embeddings=False``."""
    check_rotatable(cfg)
    src = flatten_dict(dict(params))
    flat = {k: np.asarray(v) for k, v in src.items()}
    dtypes = {k: v.dtype for k, v in flat.items()}
    out: dict = {}
    d = cfg.hidden_size
    s = random_signs(d, seed)

    def need(path):
        if path not in flat:
            raise UserError(
                f"parameters have no '{'/'.join(path)}' (the {cfg.family} model config expects "
                "one); allowed: parameters of the same model config."
            )
        return np.asarray(flat[path], np.float64)

    def reads(w, g):  # Q^T diag(g) W for W (D, out); Q^T = H^T diag(s)
        return hadamard_numpy(((s * g)[:, None] * w).T).T

    def writes(w):  # W Q = (W diag(s)) H over the last axis (D)
        return hadamard_numpy(w * s)

    def fold_norm(ln, readers):
        g, identity = _gain(cfg, need(ln + ("scale",)))
        out[ln + ("scale",)] = identity
        found = [r for r in readers if r in flat]
        if not found:
            raise UserError(f"norm '{'/'.join(ln)}' has no consumer kernel in the parameters.")
        for r in found:
            out[r] = reads(need(r), g)

    for i in range(cfg.num_layers):
        layer = (f"layer_{i}",)
        fold_norm(layer + ("attn_ln",), [layer + r for r in ATTENTION_READERS])
        fold_norm(layer + ("ffn_ln",), [layer + r for r in FFN_READERS])
        for w in WRITERS:
            kernel = layer + w + ("kernel",)
            # rows: the online Hadamard's inverse H^T; columns: the residual rotation Q
            out[kernel] = hadamard_numpy(writes(need(kernel)).T).T
            if layer + w + ("bias",) in flat:
                out[layer + w + ("bias",)] = writes(need(layer + w + ("bias",)))
    table = need(("embed", "word", "embedding"))  # (V, D)
    head = ("lm_head", "kernel")
    g, identity = _gain(cfg, need(("final_ln", "scale")))
    out[("final_ln", "scale")] = identity
    out[head] = reads(table.T if cfg.tie_embeddings else need(head), g)
    out[("embed", "word", "embedding")] = writes(table)
    dtypes.setdefault(head, dtypes[("embed", "word", "embedding")])
    new = dict(src)
    for k, v in out.items():
        new[k] = jnp.asarray(v, dtypes[k])
    cfg2 = cfg.replace(rotated=True, rotation_seed=int(seed), tie_embeddings=False)
    info = {
        "rotation_seed": int(seed),
        "residual_block": hadamard_order(d),
        "o_proj_block": hadamard_order(cfg.num_heads * cfg.attention_head_dim),
        "down_proj_block": hadamard_order(cfg.intermediate_size),
        "untied_head": bool(cfg.tie_embeddings),
    }
    return cfg2, unflatten_dict(new), info


def rotation_seed(cfg: ModelConfig, options: Mapping | None) -> int:
    """``ptq_options.rotation_seed`` (default ``cfg.rotation_seed``), validated."""
    seed = dict(options or {}).get("rotation_seed", cfg.rotation_seed)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(
            f"config.eval.ptq_options.rotation_seed={seed!r} is invalid; allowed: an integer >= 0."
        )
    return int(seed)


def apply_rotation(cfg: ModelConfig, params, calib=None, plan=None, options=None):
    """The :class:`Transform` stage: ``(cfg', params', info)`` (``calib``, ``plan`` unused)."""
    return rotate(cfg, params, rotation_seed(cfg, options))


def rotate_variables(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """``(cfg, {"params": ...})`` -> the rotated ``(cfg', {"params": ...})`` with
    ``cfg.rotation_seed`` (the :class:`Reparametrisation`)."""
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise UserError(
            f"rotation takes the trained parameters only, got collections {extra}; rotate "
            "before calibration (allowed: {'params': ...})."
        )
    cfg2, params, _ = rotate(cfg, variables["params"], cfg.rotation_seed)
    return cfg2, {"params": params}


def rotate_params_for(cfg: ModelConfig, params):
    """Parameters of the original model (tied or untied head) rotated to fit ``cfg``, a config
    with ``rotated=True``, with ``cfg.rotation_seed``."""
    tied = "lm_head" not in params
    original = cfg.replace(rotated=False, tie_embeddings=tied)
    return rotate(original, params, cfg.rotation_seed)[1]


ROTATION_REPARAM = Reparametrisation(
    name="rotation",
    paper=PAPER,
    config_field="rotated",
    apply=rotate_variables,
    params_for=rotate_params_for,
    log_line="rotation: RMSNorm gains folded, residual stream and o_proj/down_proj inputs rotated",
)


def _check_options(options: Mapping | None) -> None:
    rotation_seed(ModelConfig(), options)


ROTATION = Transform(
    name="rotation",
    paper=PAPER,
    apply=apply_rotation,
    exact=True,
    option_fields=OPTION_FIELDS,
    check=check_rotatable,
    check_options=_check_options,
    reparametrisation=ROTATION_REPARAM,
    config_of=lambda cfg: cfg.replace(rotated=True, tie_embeddings=False),
)
