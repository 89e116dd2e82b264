"""Models whose layers run under ``nn.scan``, with per-layer variables outside.

With ``config.model.scan_layers=True`` the model traces one layer and scans it over the
stacked variables ``layers/layer/...`` (leading axis = layer), so compilation time does not
grow with depth. :class:`ScannedModel` keeps that an implementation detail: its ``init`` and
``apply`` take and return the usual per-layer variables (``layer_0/attn/q_proj/kernel``, in
every collection), so checkpoints, HF import/export, sharding rules, calibration statistics
and quantization reports see the same names and shapes as without scan. Stacking
(``jnp.stack``) and unstacking (slices) happen inside the jitted step: one copy of the
layer variables and of their gradients per call.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STACKED = "layers"  # the scanned module's name
_LAYER = re.compile(r"layer_(\d+)$")


def stack_layers(variables: dict, num_layers: int) -> dict:
    """Per-layer collections ``{layer_i: tree}`` -> ``{layers: {layer: tree (L, ...)}}``."""
    out = {}
    for name, coll in variables.items():
        coll = dict(coll)
        present = [f"layer_{i}" for i in range(num_layers) if f"layer_{i}" in coll]
        if present:
            if len(present) != num_layers:
                raise ValueError(
                    f"collection {name!r} has {len(present)} of {num_layers} layers; scanned "
                    "layers need every layer's variables."
                )
            trees = [coll.pop(k) for k in present]
            coll[STACKED] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *trees)}
        out[name] = coll
    return out


def unstack_layers(variables: dict, num_layers: int) -> dict:
    """Inverse of :func:`stack_layers` (tuples of sown values are unstacked leaf by leaf)."""
    out = {}
    for name, coll in variables.items():
        coll = dict(coll)
        if STACKED in coll:
            tree = coll.pop(STACKED)["layer"]
            for i in range(num_layers):
                coll[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], tree)
        out[name] = coll
    return out


class ScannedModel:
    """A Flax model built with scanned layers, seen with per-layer variables.

    ``init(rngs, *args, **kwargs)`` and ``apply(variables, *args, mutable=..., **kwargs)``
    behave as the module's (mutable collections come back per layer); any other attribute
    is the module's.
    """

    def __init__(self, module: nn.Module, num_layers: int):
        self.module, self.num_layers = module, num_layers

    def init(self, rngs, *args, **kwargs) -> dict:
        return unstack_layers(self.module.init(rngs, *args, **kwargs), self.num_layers)

    def apply(self, variables, *args, mutable: Any = False, **kwargs):
        stacked = stack_layers(dict(variables), self.num_layers)
        out = self.module.apply(stacked, *args, mutable=mutable, **kwargs)
        if mutable is False:
            return out
        y, collections = out
        return y, unstack_layers(dict(collections), self.num_layers)

    def __getattr__(self, name: str):
        if name in ("module", "num_layers"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.module, name)

    def __hash__(self):
        return hash((self.module, self.num_layers))

    def __eq__(self, other):
        return (
            isinstance(other, ScannedModel)
            and self.module == other.module
            and self.num_layers == other.num_layers
        )
