"""Pure train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is jitted with ``donate_argnums=(0,)``; its
dropout RNG is ``fold_in(base_rng, step)``, so a resumed run draws the same numbers as an
uninterrupted one. With ``grad_accum = A`` the batch (B, ...) is split into A micro-batches
of B/A rows whose gradients are averaged (weighted by their token counts) in a ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qtx.train.losses import model_inputs, task_loss


@flax.struct.dataclass
class TrainState:
    """``step`` (int32), ``params``, ``opt_state`` and the other variable collections
    (``extra``, e.g. frozen ``quant_stats``) of the model."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any


def create_state(params, tx: optax.GradientTransformation, extra=None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), extra or {})


TEACHER = "teacher"  # the collection of ``TrainState.extra`` holding the frozen teacher params
DISTILL_LOSSES = ("kl", "soft_ce")


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Knowledge distillation in the train step from a frozen ``teacher`` model whose
    parameters are ``state.extra['teacher']`` (run in eval mode, no gradient).

    ``loss`` ``kl``: ``T^2 KL(p_t || p_s)`` at temperature ``T``; ``soft_ce``: the soft
    cross-entropy ``-sum_c p_t,c log p_s,c`` (Quantization Variation; T = 1 in the paper).
    ``task_weight`` scales the task (hard-label) loss in the gradient: 0 trains on the
    teacher alone."""

    teacher: nn.Module
    weight: float = 1.0
    temperature: float = 1.0
    loss: str = "kl"
    task_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepHooks:
    """What a training method adds to ``train_step``, as pure functions traced in the step.

    * ``collections``: variable collections the training forward pass writes (``mutable``);
      ``loss`` and ``observe`` get them as ``collected``.
    * ``loss(params, out, collected, batch, step) -> (scalar, metrics)``: added to the loss.
    * ``observe(collected) -> pytree``: read off the forward pass with no gradient (the last
      micro-batch's under gradient accumulation).
    * ``update(extra, observed, step) -> (extra, metrics)``: after the optimizer update;
      updates method state kept in ``state.extra`` (e.g. oscillation counts).
    """

    collections: tuple[str, ...] = ()
    loss: Callable | None = None
    observe: Callable | None = None
    update: Callable | None = None


def distillation_loss(student, teacher, batch: dict, temperature: float, kind: str = "kl"):
    """Knowledge distillation from ``teacher`` logits, a scalar.

    Classes: ``kind='kl'``: ``T^2 * KL(softmax(t / T) || softmax(s / T))``; ``'soft_ce'``:
    ``-T^2 sum_c softmax(t / T)_c log softmax(s / T)_c``; averaged over examples (masked by
    ``example_mask``) or real tokens (``attention_mask``, for (B, T, V) logits). One output
    (regression): the mean squared difference.
    """
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    if s.shape[-1] == 1:
        per = jnp.square(s - t)[..., 0]
    else:
        log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
        log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
        target = log_pt if kind == "kl" else 0.0
        per = temperature**2 * jnp.sum(jnp.exp(log_pt) * (target - log_ps), axis=-1)
    w = batch.get("attention_mask") if per.ndim == 2 else batch.get("example_mask")
    w = jnp.ones(per.shape, jnp.float32) if w is None else w.astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def _forward_loss(
    model: nn.Module,
    family: str,
    task: str,
    params,
    extra,
    batch,
    rng,
    step,
    hooks: StepHooks,
    distill: Distillation | None = None,
):
    inputs = model_inputs(family, batch)
    own = {k: v for k, v in extra.items() if k != TEACHER}
    variables = {"params": params, **own}
    kwargs = dict(deterministic=False, rngs={"dropout": rng})
    if hooks.collections:
        out, collected = model.apply(variables, **inputs, mutable=list(hooks.collections), **kwargs)
    else:
        out, collected = model.apply(variables, **inputs, **kwargs), {}
    loss_sum, count, metrics = task_loss(task, out["logits"], batch)
    loss = loss_sum / jnp.maximum(count, 1.0)
    means = {}  # per-batch means (averaged over micro-batches), unlike the task's sums
    if distill is not None:
        t_logits = distill.teacher.apply({"params": extra[TEACHER]}, **inputs)["logits"]
        kd = distillation_loss(out["logits"], t_logits, batch, distill.temperature, distill.loss)
        loss = distill.task_weight * loss + distill.weight * kd
        means["distill"] = kd
    if hooks.loss is not None:
        extra_loss, extra_metrics = hooks.loss(params, out, collected, batch, step)
        loss = loss + extra_loss
        means.update(extra_metrics)
    observed = None
    if hooks.observe is not None:
        observed = jax.lax.stop_gradient(hooks.observe(collected))
    return loss, (loss_sum, count, (metrics, means), observed)


def make_train_step(
    model: nn.Module,
    family: str,
    task: str,
    tx,
    schedule,
    base_rng,
    grad_accum: int = 1,
    hooks: StepHooks | None = None,
    distill: Distillation | None = None,
):
    """Builds the pure ``train_step(state, batch)``. ``hooks`` add a method's loss terms and
    state updates (:class:`StepHooks`); ``distill`` adds ``weight * distillation_loss``
    against the teacher whose parameters are ``state.extra['teacher']``. Task metrics are
    sums over micro-batches; ``distill`` and the hooks' loss metrics are means."""
    hooks = hooks or StepHooks()

    def grads_of(params, extra, batch, rng, step):
        fn = jax.value_and_grad(_forward_loss, argnums=3, has_aux=True)
        (_, (loss_sum, count, metrics, observed)), g = fn(
            model, family, task, params, extra, batch, rng, step, hooks, distill
        )
        return g, loss_sum, count, metrics, observed

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_rng, state.step)
        if grad_accum == 1:
            g, loss_sum, count, metrics, observed = grads_of(
                state.params, state.extra, batch, rng, state.step
            )
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch
            )

            def body(carry, i_mb):
                i, mb = i_mb
                g, ls, n, m, obs = grads_of(
                    state.params, state.extra, mb, jax.random.fold_in(rng, i), state.step
                )
                acc_g, acc_ls, acc_n, acc_m, _ = carry
                acc_g = jax.tree.map(lambda a, b: a + b * n, acc_g, g)
                acc_m = jax.tree.map(jnp.add, acc_m, m)
                return (acc_g, acc_ls + ls, acc_n + n, acc_m, obs), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            m0, obs0 = jax.eval_shape(
                lambda: grads_of(state.params, state.extra, first, rng, state.step)[3:]
            )
            m0, obs0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (m0, obs0))
            (g, loss_sum, count, metrics, observed), _ = jax.lax.scan(
                body, (zeros, 0.0, 0.0, m0, obs0), (jnp.arange(grad_accum), micro)
            )
            g = jax.tree.map(lambda x: x / jnp.maximum(count, 1.0), g)
            metrics = (metrics[0], jax.tree.map(lambda m: m / grad_accum, metrics[1]))
        metrics = {**metrics[0], **metrics[1]}
        grad_norm = optax.tree.norm(g)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra
        if hooks.update is not None:
            extra, update_metrics = hooks.update(extra, observed, state.step)
            metrics = {**metrics, **update_metrics}
        out = {
            "loss": loss_sum / jnp.maximum(count, 1.0),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "count": count,
            **{k: v for k, v in metrics.items() if jnp.ndim(v) == 0},
        }
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        return new, out

    return train_step


def make_eval_step(model: nn.Module, family: str, task: str, collections=("intermediates",)):
    """``eval_step(variables, batch) -> (metrics, collected)``: summed loss / count / correct
    of one batch (for ``classification`` also the per-example ``pred``, ``label`` and
    ``weight``) and the sown collections (outlier statistics) as a dict."""

    def eval_step(variables, batch):
        variables = {k: v for k, v in variables.items() if k != TEACHER}
        out, collected = model.apply(
            variables, **model_inputs(family, batch), mutable=list(collections)
        )
        logits = out["logits"]
        loss_sum, count, metrics = task_loss(task, logits, batch)
        if task == "classification":  # per-example predictions for the GLUE scores
            w = batch.get("example_mask")
            metrics = {
                **metrics,
                "pred": logits[:, 0] if logits.shape[-1] == 1 else jnp.argmax(logits, -1),
                "label": batch["label"],
                "weight": jnp.ones(logits.shape[:1]) if w is None else w,
            }
        return {"loss_sum": loss_sum, "count": count, **metrics}, dict(collected)

    return eval_step
