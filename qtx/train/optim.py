"""The papers' optimizer recipes: AdamW, weight-decay masks, warmup + decay, clipping.

``config.optim`` fields (defaults in :data:`DEFAULTS`)::

    lr, b1, b2, eps, weight_decay
    decay_ln_gamma    also decay LayerNorm gamma (OPT recipe: yes; BERT recipe: no)
    no_decay          regexes of parameter paths never decayed (e.g. position tables)
    schedule          'linear' (warmup then linear decay to 0), 'cosine' or 'constant'
    warmup_steps
    clip_norm         global-norm clipping (1.0); 0 disables
    grad_accum        micro-batches per step (handled by the train step)

Biases, LayerNorm beta and quantizer steps/offsets are never decayed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError

DEFAULTS = dict(
    lr=1e-4,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.01,
    decay_ln_gamma=False,
    no_decay=(),
    schedule="linear",
    warmup_steps=0,
    clip_norm=1.0,
    grad_accum=1,
)
SCHEDULES = ("linear", "cosine", "constant")


def optim_settings(cfg: Mapping | None) -> dict:
    """``config.optim`` with defaults applied and validated (errors name the field)."""
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(
            f"config.optim has unknown field(s) {unknown}; allowed: {sorted(DEFAULTS)}."
        )
    s = {**DEFAULTS, **given}

    def bad(field, allowed):
        raise UserError(f"config.optim.{field}={s[field]!r} is invalid; allowed: {allowed}.")

    if not s["lr"] > 0:
        bad("lr", "a positive number")
    for f in ("b1", "b2"):
        if not 0 <= s[f] < 1:
            bad(f, "a number in [0, 1)")
    if s["weight_decay"] < 0:
        bad("weight_decay", "a number >= 0")
    if s["schedule"] not in SCHEDULES:
        bad("schedule", ", ".join(SCHEDULES))
    if int(s["warmup_steps"]) < 0:
        bad("warmup_steps", "an integer >= 0")
    if s["clip_norm"] < 0:
        bad("clip_norm", "a number >= 0 (0 disables clipping)")
    if int(s["grad_accum"]) < 1:
        bad("grad_accum", "an integer >= 1")
    s["no_decay"] = tuple(s["no_decay"] or ())
    return s


def learning_rate(s: dict, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then linear / cosine decay to 0 at ``total_steps``."""
    warm = int(s["warmup_steps"])
    decay_steps = max(total_steps - warm, 1)
    if s["schedule"] == "constant":
        after = optax.constant_schedule(s["lr"])
    elif s["schedule"] == "cosine":
        after = optax.cosine_decay_schedule(s["lr"], decay_steps)
    else:
        after = optax.linear_schedule(s["lr"], 0.0, decay_steps)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, s["lr"], warm), after], [warm])


def decay_mask(params, s: dict):
    """True where weight decay applies: kernels, embedding tables (and LN gamma if asked)."""
    flat = flatten_dict(params)
    patterns = [re.compile(p) for p in s["no_decay"]]
    names = ("kernel", "embedding", "hidden_kernel", "out_kernel")

    def decays(path):
        leaf = path[-1]
        name = "/".join(path)
        if any(p.search(name) for p in patterns):
            return False
        return leaf in names or (s["decay_ln_gamma"] and leaf == "scale")

    return unflatten_dict({k: decays(k) for k in flat})


def make_optimizer(
    cfg: Mapping | None, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the recipe's clipping, schedule and decay mask; returns (tx, schedule)."""
    s = optim_settings(cfg)
    schedule = learning_rate(s, total_steps)
    parts = []
    if s["clip_norm"] > 0:
        parts.append(optax.clip_by_global_norm(s["clip_norm"]))
    parts.append(
        optax.adamw(
            schedule,
            b1=s["b1"],
            b2=s["b2"],
            eps=s["eps"],
            weight_decay=s["weight_decay"],
            mask=lambda p: decay_mask(p, s),
        )
    )
    return optax.chain(*parts), schedule
