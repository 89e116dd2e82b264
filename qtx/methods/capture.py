"""What the post-training methods see of a model: its linear layers' inputs on calibration data.

The shared calibration base of SmoothQuant, Outlier Suppression+ and GPTQ. The model runs in
full precision (no quantization point active) over the calibration batches; every
:class:`qtx.nn.layers.Dense` call is intercepted (``flax.linen.intercept_methods``) and its
input ``x`` (..., in) is reduced over the real tokens only (the batch's ``attention_mask``;
padding never reaches a statistic) to:

* ``"absmax"``: (in,) ``max |x_j|``;
* ``"min"`` / ``"max"``: (in,) per-channel extremes;
* ``"hessian"``: (in, in) ``X^T X`` summed in float32, with ``"count"`` the number of rows
  (GPTQ's ``H = 2 X^T X / n``);
* ``"rows"``: up to ``max_rows`` real rows (n, in) of ``x`` (an output-error search's
  sample), taken in batch order.

Statistics are keyed by the Dense module's path (``layer_0/attn/q_proj``); the caller picks
which layers with ``paths``. One compilation serves every batch; parameters may change
between calls without recompiling (GPTQ's layer-by-layer pass reruns it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtx.models import ModelConfig, build
from qtx.nn.layers import Dense
from qtx.train.losses import model_inputs

STATS = ("absmax", "min", "max", "hessian", "rows")


def token_rows(x, batch: dict):
    """``x`` (..., in) as (n, in) float32 rows and (n,) bool real rows: the rows whose leading
    (B, T) position is a real token of ``batch["attention_mask"]`` (every row when the batch
    has no mask or ``x`` has no token axis, e.g. a pooled (B, D) input)."""
    x = jnp.asarray(x, jnp.float32)
    rows = x.reshape(-1, x.shape[-1])
    mask = batch.get("attention_mask")
    if mask is None or x.ndim < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return rows, jnp.ones((rows.shape[0],), bool)
    per_token = int(np.prod(x.shape[2:-1], dtype=np.int64))  # extra axes, e.g. heads
    valid = jnp.repeat(jnp.asarray(mask, bool).reshape(-1), per_token)
    return rows, valid


def _reduce(stat: str, rows, valid):
    if stat == "absmax":
        return jnp.max(jnp.where(valid[:, None], jnp.abs(rows), 0.0), axis=0)
    if stat == "max":
        return jnp.max(jnp.where(valid[:, None], rows, -jnp.inf), axis=0)
    if stat == "min":
        return jnp.min(jnp.where(valid[:, None], rows, jnp.inf), axis=0)
    if stat == "hessian":
        r = jnp.where(valid[:, None], rows, 0.0)
        h = jnp.dot(r.T, r, precision=jax.lax.Precision.HIGHEST)
        return {"hessian": h, "count": jnp.sum(valid).astype(jnp.float32)}
    raise ValueError(f"statistic {stat!r}; allowed: {', '.join(STATS)}")


def _combine(stat: str, old, new):
    if old is None:
        return new
    if stat == "absmax" or stat == "max":
        return np.maximum(old, new)
    if stat == "min":
        return np.minimum(old, new)
    return jax.tree.map(np.add, old, new)  # hessian + count


def _first_rows(rows, valid, n: int):
    """Up to ``n`` rows, the real ones first in order (``(rows, valid)`` of the kept)."""
    order = jnp.argsort(~valid, stable=True)[:n]
    return rows[order], valid[order]


def _forward(cfg: ModelConfig, stat: str, wanted: Callable[[str], bool], max_rows: int):
    model = build(cfg.replace(scan_layers=False))  # the same variables, layer_i by name

    def run(params, batch):
        out, seen = {}, {}  # seen: one statistic per input (q/k/v read the same x)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, Dense) and context.method_name == "__call__":
                path = "/".join(module.path)
                if wanted(path) and args:
                    x = args[0]
                    if id(x) not in seen:
                        rows, valid = token_rows(x, batch)
                        if stat == "rows":
                            seen[id(x)] = (x, _first_rows(rows, valid, max_rows))
                        else:
                            seen[id(x)] = (x, _reduce(stat, rows, valid))
                    out[path] = seen[id(x)][1]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, **model_inputs(cfg.family, batch))
        return out

    return jax.jit(run)


def dense_inputs(
    cfg: ModelConfig,
    params,
    batches: Iterable[dict],
    stat: str,
    paths: Sequence[str] | Callable[[str], bool] | None = None,
    max_rows: int = 2048,
    forward=None,
) -> dict:
    """``{Dense path: statistic}`` of the inputs of the model's Dense layers over ``batches``
    (real tokens only; see the module docstring for ``stat``). ``paths``: the Dense paths to
    keep (a collection, or a predicate; None: all). ``forward``: a compiled pass from
    :func:`compiled_pass` to reuse (same ``cfg``, ``stat`` and ``paths``). Results are NumPy."""
    if stat not in STATS:
        raise ValueError(f"statistic {stat!r}; allowed: {', '.join(STATS)}")
    run = forward or compiled_pass(cfg, stat, paths, max_rows)
    acc: dict = {}
    for batch in batches:
        got = run(params, batch)
        for path, value in got.items():
            if stat == "rows":
                rows, valid = (np.asarray(v) for v in value)
                have = acc.get(path)
                taken = 0 if have is None else sum(len(r) for r in have)
                if taken < max_rows:
                    acc.setdefault(path, []).append(rows[valid][: max_rows - taken])
                continue
            acc[path] = _combine(stat, acc.get(path), jax.tree.map(np.asarray, value))
    if stat == "rows":
        return {k: np.concatenate(v, axis=0) for k, v in acc.items()}
    return acc


def compiled_pass(cfg: ModelConfig, stat: str, paths=None, max_rows: int = 2048):
    """The jitted ``(params, batch) -> {path: per-batch statistic}`` :func:`dense_inputs`
    runs (build it once and pass it as ``forward`` to rerun with changed parameters). Layers
    that read the same input share one statistic; ``rows`` keeps at most ``max_rows`` per
    batch on the device."""
    if paths is None:
        wanted = lambda p: True  # noqa: E731
    elif callable(paths):
        wanted = paths
    else:
        keep = frozenset(paths)
        wanted = keep.__contains__
    return _forward(cfg, stat, wanted, max_rows)
