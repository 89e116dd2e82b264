"""Token-wise clipping: activation ranges that minimise the model's output error.

Objective: ``min_s ||f_hat(s) - f||^2``, ``f`` the full-precision model's final output and
``f_hat`` the quantized model's, over the calibration samples (:func:`objective_output`: the
logits when the model has a head, else the last hidden state; token outputs over real tokens).

* Coarse stage (:func:`coarse_search`). Each quantized activation's per-token max and min are
  collected on the full-precision model, padding tokens removed. For one ``alpha`` every
  activation's range is ``upper = quantile(|token max|, alpha)``, ``lower =
  -quantile(|token min|, alpha)``, each snapped to the nearest actual token max / min inside it
  (:func:`clip_range`). One global ``alpha`` is picked from :func:`alpha_grid` by the output
  MSE. Attention probabilities and the head inputs (pooler input and output, classifier
  input: one row per example, not per token) keep their plain min/max (``minmax_points``, as
  the reference), and so do activations that are not per-tensor.
* Fine stage (:func:`fine_tune`). Every activation quantizer becomes LSQ+ (learnable step and
  offset) initialised to equal its coarse quantizer; only those parameters train, with Adam
  and a cosine decay to 0, on the same output MSE (paper: lr 1e-5, 3 epochs). The output MSE
  over all calibration batches is measured before training and after every epoch, and the
  best state is kept, so the stage never returns a worse objective than it started from.

``quantize_weights`` (default True, as the paper's objective: ``f_hat`` is the quantized model)
keeps the weights quantized during both stages; False searches with full-precision weights,
as the reference code does.

Every forward and gradient step is jitted; ranges enter as inputs, so a search compiles once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.ptq import with_quantizer_params
from qtx.methods.kinds import QATInit
from qtx.models import ModelConfig, build
from qtx.quant.ranges import qparams_from_range
from qtx.train.losses import model_inputs
from qtx.train.mesh import fetch

MINMAX_POINTS = (
    r"(^|/)attn/softmax$",
    r"(^|/)pooler/(in|out)$",
    r"(^|/)(dist_)?classifier/in$",
)
CACHE_BYTES = 512 * 2**20  # full-precision outputs are kept on device up to this size


@dataclasses.dataclass(frozen=True)
class TWCSettings:
    """Token-wise clipping settings (the paper's values are the defaults).

    ``alpha_step``/``num_alphas``: the grid ``1 - alpha_step * i`` (:func:`alpha_grid`);
    ``fine_lr``/``fine_epochs``: Adam with cosine decay over the calibration batches (0
    epochs: coarse stage only); ``quantize_weights``: weights quantized during the search;
    ``minmax_points``: patterns of activations that keep their calibrated range; ``output``:
    the model output the objective compares (None: :func:`objective_output`'s default).
    """

    alpha_step: float = 0.01
    num_alphas: int | None = None
    fine_lr: float = 1e-5
    fine_epochs: int = 3
    quantize_weights: bool = True
    minmax_points: tuple[str, ...] = MINMAX_POINTS
    output: str | None = None

    def __post_init__(self):
        def bad(field, allowed):
            raise UserError(
                f"token-wise clipping setting {field}={getattr(self, field)!r} is invalid; "
                f"allowed: {allowed}."
            )

        if not 0.0 < self.alpha_step < 1.0:
            bad("alpha_step", "a number in (0, 1)")
        if self.num_alphas is not None and not 1 <= self.num_alphas <= round(1 / self.alpha_step):
            bad("num_alphas", f"None or an integer in [1, {round(1 / self.alpha_step)}]")
        if not self.fine_lr >= 0:
            bad("fine_lr", "a number >= 0")
        if int(self.fine_epochs) != self.fine_epochs or self.fine_epochs < 0:
            bad("fine_epochs", "an integer >= 0")
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            bad("output", "None or the name of a model output, e.g. 'logits', 'pooled'")
        object.__setattr__(self, "minmax_points", tuple(self.minmax_points))


def alpha_grid(bits: int, step: float = 0.01, num: int | None = None) -> np.ndarray:
    """Candidates ``alpha = 1 - step * i``, ``i < n``. By default ``n = 10 * 3^((8 - b) / 2)``
    (at least 10, and alpha stays above 0): the reference's 10 / 30 / 90 candidates at 8 / 6 /
    4 bits, and a grid for any other width (2 bits: down to 0.02)."""
    if num is None:
        num = max(10, round(10 * 3 ** ((8 - bits) / 2)))
        num = min(num, round(1.0 / step) - 1)
    return 1.0 - step * np.arange(num, dtype=np.float64)


@jax.jit
def clip_range(tmax, tmin, alpha):
    """``(lower, upper)`` of one activation from its token-wise extremes (N,) at ``alpha``.

    ``u = quantile(|tmax|, alpha)``, ``upper`` the largest token max <= u (``u`` if none);
    ``l = -quantile(|tmin|, alpha)``, ``lower`` the smallest token min >= l (``l`` if none).
    """
    u = jnp.quantile(jnp.abs(tmax), alpha)
    upper = jnp.max(jnp.where(tmax <= u, tmax, -jnp.inf))
    upper = jnp.where(jnp.isfinite(upper), upper, u)
    lo = -jnp.quantile(jnp.abs(tmin), alpha)
    lower = jnp.min(jnp.where(tmin >= lo, tmin, jnp.inf))
    lower = jnp.where(jnp.isfinite(lower), lower, lo)
    return lower, upper


def length_buckets(batches: Sequence[dict], multiple: int = 16) -> list[dict]:
    """The calibration samples regrouped by length, for the search objective.

    Every sample is kept; they are sorted by the position after their last real token, cut
    into batches of the original size, and each batch is trimmed to its longest sample
    (rounded up to ``multiple``). Only trailing padding is removed, which the model ignores
    (masked keys, masked output error; positions are unchanged), so the output MSE summed over
    the samples, the token extremes and the FP outputs are those of the original batches, with
    less compute (short sentences pad to the sequence length otherwise). Batches without an
    ``attention_mask``, of unequal shapes, or spread over several processes are returned as
    they are.
    """
    batches = list(batches)
    if not batches or any("attention_mask" not in b for b in batches):
        return batches
    if any(not getattr(v, "is_fully_addressable", True) for b in batches for v in b.values()):
        return batches
    host = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    shapes = {k: {b[k].shape for b in host} for k in host[0]}
    if any(len(v) != 1 for v in shapes.values()) or any(set(b) != set(host[0]) for b in host):
        return batches
    size, t = host[0]["attention_mask"].shape
    merged = {k: np.concatenate([b[k] for b in host]) for k in host[0]}
    real = merged["attention_mask"] != 0
    end = np.where(real.any(1), t - np.argmax(real[:, ::-1], axis=1), 0)
    order = np.argsort(end, kind="stable")
    out = []
    for lo in range(0, len(order), size):
        rows = order[lo : lo + size]
        keep = min(t, -(-max(int(end[rows].max()), 1) // multiple) * multiple)
        out.append(
            {
                k: jnp.asarray(v[rows][:, :keep] if v.ndim >= 2 and v.shape[1] == t else v[rows])
                for k, v in merged.items()
            }
        )
    return out


def objective_output(outputs, name: str | None = None) -> str:
    """The key of the model output the objective compares: ``name`` if given, else
    ``logits`` when the model has a head, else ``last_hidden_state`` (B, T, D).
    ``outputs``: the model's output dict (arrays or shapes)."""
    arrays = sorted(k for k, v in outputs.items() if hasattr(v, "shape"))
    if name is None:
        name = "logits" if "logits" in arrays else "last_hidden_state"
    if name not in arrays:
        raise UserError(
            f"token-wise clipping setting output={name!r} is not an output of this model; "
            f"allowed: {', '.join(arrays)}."
        )
    return name


def output_error(out, ref, batch):
    """``(sum of squared errors, count)`` of the output ``out`` against ``ref``; token outputs
    (B, T, V) count real tokens only (``attention_mask`` (B, T))."""
    err = jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32))
    mask = batch.get("attention_mask")
    if err.ndim == 3 and mask is not None and tuple(mask.shape) == err.shape[:2]:
        w = mask.astype(jnp.float32)[..., None]
        return jnp.sum(err * w), jnp.sum(w) * err.shape[-1]
    return jnp.sum(err), jnp.asarray(err.size, jnp.float32)


class Reference:
    """The full-precision outputs ``f`` of the calibration batches: cached on device when
    they fit in ``CACHE_BYTES``, else recomputed (jitted) each time they are needed.

    ``output``: the model output compared (``key``, see :func:`objective_output`)."""

    def __init__(self, cfg: ModelConfig, params, batches: Sequence[dict], output=None):
        self.model = build(cfg, quant.QuantPlan())
        self.params = params
        family = cfg.family

        def forward(p, b):
            return self.model.apply({"params": p}, **model_inputs(family, b))

        self.key = objective_output(jax.eval_shape(forward, params, batches[0]), output)
        self._fp = jax.jit(lambda p, b: forward(p, b)[self.key])
        first = jax.eval_shape(self._fp, params, batches[0])
        size = np.prod(first.shape) * 4 * len(batches)
        self.cached = [self._fp(params, b) for b in batches] if size <= CACHE_BYTES else None
        self.family = family

    def output(self, i: int, batch):
        """The full-precision output ``key`` of calibration batch ``i``."""
        if self.cached is not None:
            return self.cached[i]
        return self._fp(self.params, batch)


def collect_token_extremes(
    cfg: ModelConfig, plan: quant.QuantPlan, params, batches: Sequence[dict]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{point: (token max (N,), token min (N,))}`` of every activation the plan quantizes,
    on the full-precision model, padding tokens removed (float32 NumPy)."""
    model = build(cfg, plan.with_mode("off"))

    @jax.jit
    def record(p, batch):
        _, coll = model.apply(
            {"params": p}, **model_inputs(cfg.family, batch), mutable=[quant.TOKENS]
        )
        return coll[quant.TOKENS]

    acc: dict[str, list] = {}
    for batch in batches:
        rec = fetch(record(params, batch))
        mask = batch.get("attention_mask")
        mask = None if mask is None else np.asarray(fetch(mask)).astype(bool)
        for path, leaf in flatten_dict(rec).items():
            name, which = "/".join(path[:-1]), path[-1]
            leaf = np.asarray(leaf, np.float32)
            if mask is not None and leaf.shape == mask.shape:
                leaf = leaf[mask]
            acc.setdefault(name, {"max": [], "min": []})[which].append(leaf.reshape(-1))
    return {k: (np.concatenate(v["max"]), np.concatenate(v["min"])) for k, v in acc.items()}


def clipped_points(
    plan: quant.QuantPlan, stats, extremes: dict, minmax_points: Sequence[str]
) -> list[str]:
    """Activation points whose range token-wise clipping sets: calibrated per-tensor points
    with recorded extremes, except ``minmax_points``."""
    out = []
    for path, leaf in flatten_dict(stats).items():
        name = "/".join(path[:-1])
        if path[-1] != "hi" or np.ndim(leaf) != 0 or name not in extremes:
            continue
        if any(re.search(p, name) for p in minmax_points):
            continue
        out.append(name)
    return sorted(out)


def stats_with_ranges(stats, ranges: dict[str, tuple]):
    """``quant_stats`` with ``lo``/``hi`` of the named points replaced (pure)."""
    flat = dict(flatten_dict(stats))
    for name, (lo, hi) in ranges.items():
        key = tuple(name.split("/"))
        flat[key + ("lo",)] = jnp.asarray(lo, jnp.float32).reshape(flat[key + ("lo",)].shape)
        flat[key + ("hi",)] = jnp.asarray(hi, jnp.float32).reshape(flat[key + ("hi",)].shape)
    return unflatten_dict(flat)


def make_error_fn(cfg: ModelConfig, plan: quant.QuantPlan, ref: Reference) -> Callable:
    """``error(variables, batches) -> mean squared output error`` of ``plan`` in quantize mode."""
    model = build(cfg, plan.with_mode("quantize"))

    @jax.jit
    def batch_error(variables, batch, fp):
        out = model.apply(variables, **model_inputs(cfg.family, batch))[ref.key]
        return output_error(out, fp, batch)

    def error(variables, batches):
        total, count = 0.0, 0.0
        for i, b in enumerate(batches):
            s, n = batch_error(variables, b, ref.output(i, b))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    return error


def coarse_search(
    cfg: ModelConfig,
    plan: quant.QuantPlan,
    variables: dict,
    batches: Sequence[dict],
    ref: Reference,
    bits: int,
    settings: TWCSettings = TWCSettings(),
) -> tuple[dict, dict]:
    """Picks one alpha for all clipped activations by the output MSE.

    ``variables``: params and calibrated ``quant_stats`` of ``plan`` (the ranges of points
    that are not clipped are kept). Returns the variables with the best ranges and ``{"alpha",
    "output_mse", "alphas", "errors", "points"}``.
    """
    extremes = collect_token_extremes(cfg, plan, variables["params"], batches)
    names = clipped_points(plan, variables[quant.STATS], extremes, settings.minmax_points)
    if not names:
        raise UserError(
            "token-wise clipping found no per-tensor activation quantizer to clip; allowed: a "
            "setup that quantizes activations per tensor (e.g. os_fastertransformer)."
        )
    dev = {n: tuple(jnp.asarray(a) for a in extremes[n]) for n in names}
    error = make_error_fn(cfg, plan, ref)
    alphas = alpha_grid(bits, settings.alpha_step, settings.num_alphas)
    errors = []
    best = (np.inf, None, None)
    for alpha in alphas:
        ranges = {n: clip_range(*dev[n], jnp.float32(alpha)) for n in names}
        trial = {**variables, quant.STATS: stats_with_ranges(variables[quant.STATS], ranges)}
        e = error(trial, batches)
        errors.append(e)
        if e < best[0]:
            best = (e, float(alpha), trial)
    info = {
        "alpha": best[1],
        "output_mse": best[0],
        "alphas": [float(a) for a in alphas],
        "errors": errors,
        "points": len(names),
    }
    return best[2], info


def learnable_plan(plan: quant.QuantPlan) -> quant.QuantPlan:
    """``plan`` with every calibrated activation rule turned into LSQ+ (step and offset)."""
    rules = []
    for r in plan.rules:
        s = r.spec
        if s is not None and r.kind != "weight" and not s.dynamic and s.learn == "none":
            if r.kind == "any":  # weights matched by the same rule stay as they were
                rules.append(dataclasses.replace(r, kind="weight"))
            r = dataclasses.replace(r, spec=s.replace(learn="lsq+"), kind="act")
        rules.append(r)
    return dataclasses.replace(plan, rules=tuple(rules))


def _steps_from_ranges(params: dict, stats, plan: quant.QuantPlan) -> dict:
    """Flat ``params`` with the step (and offset) of every activation point that has both
    and a calibrated range set so the learnable quantizer equals the frozen one of ``plan``:
    ``s`` and ``-z * s`` (``clip(round((x + z s) / s), qmin, qmax) s - z s`` is exactly the
    frozen quantizer)."""
    params = dict(params)
    flat = flatten_dict(stats)
    for path, lo in flat.items():
        key = path[:-1]
        if path[-1] != "lo" or key + ("step",) not in params:
            continue
        spec, _ = plan.resolve("/".join(key), "act")
        if spec is None:
            continue
        s, z = qparams_from_range(lo, flat[key + ("hi",)], spec)
        params[key + ("step",)] = jnp.asarray(s, jnp.float32).reshape(params[key + ("step",)].shape)
        if key + ("offset",) in params:
            shape = params[key + ("offset",)].shape
            params[key + ("offset",)] = jnp.asarray(-z * s, jnp.float32).reshape(shape)
    return params


def init_learnable_from_ranges(cfg, plan: quant.QuantPlan, variables: dict) -> dict:
    """Params of ``learnable_plan(plan)`` whose LSQ+ quantizers start as the frozen ones of
    ``plan`` on the calibrated ranges of ``variables['quant_stats']``."""
    params = flatten_dict(with_quantizer_params(cfg, learnable_plan(plan), variables["params"]))
    params = _steps_from_ranges(params, variables[quant.STATS], plan)
    return {**variables, "params": unflatten_dict(params)}


def frozen_plan(plan: quant.QuantPlan) -> quant.QuantPlan:
    """``plan`` with every learnable rule made fixed-range (same estimator and grid)."""
    rules = tuple(
        dataclasses.replace(r, spec=r.spec.replace(learn="none"))
        if r.spec is not None and r.spec.learn != "none"
        else r
        for r in plan.rules
    )
    return dataclasses.replace(plan, rules=rules)


def activation_bits(plan: quant.QuantPlan) -> int:
    """The narrowest activation width the plan uses (it sizes the alpha grid)."""
    bits = [r.spec.bits for r in plan.rules if r.spec is not None and r.kind != "weight"]
    if not bits:
        raise UserError("the setup quantizes no activation; token-wise clipping needs one.")
    return min(bits)


def qat_init(
    cfg: ModelConfig,
    plan: quant.QuantPlan,
    variables: dict,
    batches: Sequence[dict],
    settings: TWCSettings = TWCSettings(),
) -> tuple[dict, dict]:
    """Outlier Suppression's QAT init: the coarse stage picks the activation ranges of the
    calibrated QAT model (``plan`` with LSQ/LSQ+ points, ``variables`` = params with their
    steps + ``quant_stats``) on the output MSE, and every learnable activation quantizer starts
    on its range. Returns ``(variables, coarse info)``."""
    fixed = frozen_plan(plan).with_mode("quantize")
    batches = length_buckets(batches)
    ref = Reference(cfg, variables["params"], batches, settings.output)
    best, info = coarse_search(
        cfg, fixed, variables, batches, ref, activation_bits(fixed), settings
    )
    params = _steps_from_ranges(flatten_dict(variables["params"]), best[quant.STATS], fixed)
    return {**variables, "params": unflatten_dict(params), quant.STATS: best[quant.STATS]}, info


def _qat_refine(cfg, plan, variables, batches) -> tuple[dict, str]:
    variables, info = qat_init(cfg, plan, variables, batches)
    return variables, f"token-wise clipping: alpha {info['alpha']:.2f} over {info['points']} points"


# config.train.qat_init='token_wise_clipping'
QAT_INIT = QATInit(
    "token_wise_clipping",
    "Outlier Suppression (Wei et al., NeurIPS 2022; docs/methods.md §2)",
    _qat_refine,
)


def fine_tune(
    cfg: ModelConfig,
    plan: quant.QuantPlan,
    variables: dict,
    batches: Sequence[dict],
    ref: Reference,
    settings: TWCSettings = TWCSettings(),
) -> tuple[quant.QuantPlan, dict, dict]:
    """Trains the LSQ+ steps and offsets of every activation quantizer on the output MSE.

    ``variables``: params and (coarse) ``quant_stats`` of ``plan``. Returns the learnable plan
    (mode ``quantize``), its variables and ``{"output_mse_before", "output_mse_after",
    "steps"}``.
    """
    steps = int(settings.fine_epochs) * len(batches)
    if steps == 0 or settings.fine_lr == 0:
        return plan.with_mode("quantize"), variables, {"steps": 0}
    lplan = learnable_plan(plan)
    variables = init_learnable_from_ranges(cfg, plan, variables)
    flat = flatten_dict(variables["params"])
    train = {k: v for k, v in flat.items() if quant.is_quantizer_param(k)}
    frozen = {k: v for k, v in flat.items() if not quant.is_quantizer_param(k)}
    stats = variables[quant.STATS]
    model = build(cfg, lplan.with_mode("learn"))
    tx = optax.adam(optax.cosine_decay_schedule(settings.fine_lr, max(steps, 1)))

    def loss_fn(q, frozen, batch, fp):
        params = unflatten_dict({**frozen, **q})
        out = model.apply({"params": params, quant.STATS: stats}, **model_inputs(cfg.family, batch))
        s, n = output_error(out[ref.key], fp, batch)
        return s / n

    @jax.jit(donate_argnums=(0, 1))
    def train_step(q, opt_state, frozen, batch, fp):
        loss, g = jax.value_and_grad(loss_fn)(q, frozen, batch, fp)
        updates, opt_state = tx.update(g, opt_state, q)
        return optax.apply_updates(q, updates), opt_state, loss

    error = make_error_fn(cfg, lplan, ref)

    def current(q):
        return {"params": unflatten_dict({**frozen, **q}), quant.STATS: stats}

    before = error(current(train), batches)
    best = (before, jax.tree.map(jnp.copy, train), 0)
    opt_state = tx.init(train)
    for epoch in range(int(settings.fine_epochs)):
        for i, b in enumerate(batches):
            train, opt_state, _ = train_step(train, opt_state, frozen, b, ref.output(i, b))
        e = error(current(train), batches)
        if e < best[0]:
            best = (e, jax.tree.map(jnp.copy, train), epoch + 1)
    info = {
        "output_mse_before": before,
        "output_mse_after": best[0],
        "steps": steps,
        "best_epoch": best[2],
    }
    return lplan.with_mode("quantize"), current(best[1]), info
