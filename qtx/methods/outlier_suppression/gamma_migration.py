"""Gamma migration: move each LayerNorm's gamma out of the LN into the weights that read it.

A LayerNorm ``y = gamma * n(x) + beta`` becomes non-scaling, ``y' = n(x) + beta / gamma``, so
``y = gamma * y'`` and every linear layer that reads it absorbs gamma into its input columns,
``W y = (W diag(gamma)) y'`` (our kernels are (in, out): row ``j`` is scaled by ``gamma_j``).
Quantizers then see ``y'``, whose outliers gamma no longer amplifies. Exact in floating point.

Where gamma goes (``migration_map``):

* post-LN (BERT, RoBERTa, OPT-350m): the embedding LN -> layer 0's q/k/v (and gate) and its
  attention shortcut; layer i's attention LN -> its fc1 and FFN shortcut; layer i's FFN LN ->
  layer i+1's q/k/v (and gate) and attention shortcut. The last layer's FFN LN feeds the head
  and is left alone, as in the paper. The shortcut multiplies by gamma in the model
  (``ModelConfig.gamma_migrated``, see ``qtx.nn.transformer``).
* pre-LN (OPT, ViT): each LN's gamma folds into the projections after it only (the residual
  stream does not pass through the LN). The final LN (before the head) is left alone.

A gamma that is exactly 0: that channel of the LN output is the constant beta. Dividing by it
is undefined, so the migrated factor is ``g = where(gamma == 0, 1, gamma)``: the consumers and
the shortcut are multiplied by ``g`` and the non-scaling LN keeps beta and drops the normalised
value for that channel (``qtx.nn.layers.LayerNorm``); the output is still exact and finite.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.methods.kinds import Reparametrisation
from qtx.models import ModelConfig
from qtx.models.family import family_record

PAPER = "Outlier Suppression (Wei et al., NeurIPS 2022; docs/methods.md §2)"

# Parameters that read the attention input x (B, T, D): kernel (D, out), or per-head gate
# kernels that read x split into heads (H, Dh[, k]).
ATTENTION_INPUT_KERNELS = (
    ("attn", "q_proj", "kernel"),
    ("attn", "k_proj", "kernel"),
    ("attn", "v_proj", "kernel"),
    ("attn", "qkv_proj", "kernel"),
    ("attn", "gate", "dense", "kernel"),
    ("attn", "gate", "kernel"),
    ("attn", "gate", "hidden_kernel"),
)
FFN_INPUT_KERNELS = (("ffn", "fc1", "kernel"),)


def migration_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]]:
    """``[(LayerNorm path, consumer kernel paths), ...]`` of a model (paths without "params")."""

    def attn(i):
        return tuple((f"layer_{i}",) + k for k in ATTENTION_INPUT_KERNELS)

    def ffn(i):
        return tuple((f"layer_{i}",) + k for k in FFN_INPUT_KERNELS)

    n = cfg.num_layers
    if cfg.pre_ln:
        out = []
        for i in range(n):
            out += [((f"layer_{i}", "attn_ln"), attn(i)), ((f"layer_{i}", "ffn_ln"), ffn(i))]
        return out
    out = [(("embed", "ln"), attn(0))] if family_record(cfg.family).migrate_embed_ln else []
    for i in range(n):
        out.append(((f"layer_{i}", "attn_ln"), ffn(i)))
        if i < n - 1:
            out.append(((f"layer_{i}", "ffn_ln"), attn(i + 1)))
    return out


def _scaled(kernel, g, num_heads: int):
    """``kernel`` with its input axis multiplied by ``g`` (D,)."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim == 2 and kernel.shape[0] == g.shape[0]:  # (D, out)
        return kernel * g[:, None].astype(kernel.dtype)
    gh = g.reshape(num_heads, -1).astype(kernel.dtype)  # per-head gate: (H, Dh[, k])
    return kernel * (gh if kernel.ndim == 2 else gh[..., None])


def migrate_gamma(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """``(cfg, {"params": ...})`` -> the gamma-migrated ``(cfg, variables)`` (pure).

    The returned config has ``gamma_migrated=True``; the returned parameters hold ``beta / g``
    in every migrated LN's bias and ``W diag(g)`` in its consumers, with ``g =
    where(gamma == 0, 1, gamma)``; the LN's gamma stays in ``scale`` (the model reads it for
    the shortcut and the zero mask). Migrate before any calibration: ranges of the original
    model do not apply to the migrated one.
    """
    if cfg.gamma_migrated:
        raise UserError(
            "gamma migration was already applied to this model (config.model.gamma_migrated="
            "True); allowed: migrating the original parameters once."
        )
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise UserError(
            f"gamma migration takes the trained parameters only, got collections {extra}; "
            "migrate before calibration (allowed: {'params': ...})."
        )
    flat = dict(flatten_dict(variables["params"]))
    for ln, consumers in migration_map(cfg):
        if ln + ("scale",) not in flat:
            raise UserError(
                f"parameters have no LayerNorm '{'/'.join(ln)}' (the {cfg.family} model "
                "config expects one); allowed: parameters of the same model config."
            )
        gamma = jnp.asarray(flat[ln + ("scale",)], jnp.float32)
        g = jnp.where(gamma == 0, 1.0, gamma)
        if ln + ("bias",) in flat:
            flat[ln + ("bias",)] = flat[ln + ("bias",)] / g
        found = False
        for path in consumers:
            if path in flat:
                flat[path] = _scaled(flat[path], g, cfg.num_heads)
                found = True
        if not found:
            names = ["/".join(c) for c in consumers]
            raise UserError(
                f"LayerNorm '{'/'.join(ln)}' has no consumer among {names}; allowed: "
                "parameters of the same model config."
            )
    return cfg.replace(gamma_migrated=True), {"params": unflatten_dict(flat)}


def migrate_params_for(cfg: ModelConfig, params):
    """Parameters of the original model (an HF checkpoint, an unmigrated run) made to fit
    ``cfg``, a config with ``gamma_migrated=True``: ``migrate_gamma`` of the unmigrated twin."""
    unmigrated = cfg.replace(gamma_migrated=False)
    return migrate_gamma(unmigrated, {"params": params})[1]["params"]


def zero_gamma_channels(cfg: ModelConfig, params) -> dict[str, int]:
    """``{LayerNorm path: number of channels with gamma exactly 0}`` among migrated LNs."""
    flat = flatten_dict(params)
    out = {}
    for ln, _ in migration_map(cfg):
        n = int(np.sum(np.asarray(flat[ln + ("scale",)]) == 0))
        if n:
            out["/".join(ln)] = n
    return out


GAMMA_MIGRATION = Reparametrisation(
    name="gamma_migration",
    paper=PAPER,
    config_field="gamma_migrated",
    apply=migrate_gamma,
    params_for=migrate_params_for,
    log_line="gamma migration: LayerNorm gammas moved into the following weights",
)
