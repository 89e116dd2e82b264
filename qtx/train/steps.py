"""Pure train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is jitted with ``donate_argnums=(0,)``; its
dropout RNG is ``fold_in(base_rng, step)``, so a resumed run draws the same numbers as an
uninterrupted one. With ``grad_accum = A`` the batch (B, ...) is split into A micro-batches
of B/A rows whose gradients are averaged (weighted by their token counts) in a ``lax.scan``.
"""

from __future__ import annotations

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


def distillation_loss(student, teacher, batch: dict, temperature: float):
    """Knowledge distillation from ``teacher`` logits, a scalar.

    Classes: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over examples (masked by
    ``example_mask``) or real tokens (``attention_mask``, for (B, T, V) logits); one output
    (regression): the mean squared difference.
    """
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    if s.shape[-1] == 1:
        per = jnp.square(s - t)[..., 0]
    else:
        log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
        log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
        per = temperature**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
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
    deterministic: bool,
    aux: Callable | None,
    distill: tuple | None = None,
):
    inputs = model_inputs(family, batch)
    own = {k: v for k, v in extra.items() if k != TEACHER}
    out = model.apply(
        {"params": params, **own},
        **inputs,
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    )
    loss_sum, count, metrics = task_loss(task, out["logits"], batch)
    loss = loss_sum / jnp.maximum(count, 1.0)
    if distill is not None:  # (teacher model, weight, temperature); params in extra[TEACHER]
        teacher, weight, temperature = distill
        t_logits = teacher.apply({"params": extra[TEACHER]}, **inputs)["logits"]
        kd = distillation_loss(out["logits"], t_logits, batch, temperature)
        loss = loss + weight * kd
        metrics = {**metrics, "distill": kd}
    if aux is not None:  # extra loss terms (regularisers) of a method
        extra_loss, extra_metrics = aux(params, out, batch, rng)
        loss = loss + extra_loss
        metrics = {**metrics, **extra_metrics}
    return loss, (loss_sum, count, metrics)


def make_train_step(
    model: nn.Module,
    family: str,
    task: str,
    tx,
    schedule,
    base_rng,
    grad_accum: int = 1,
    aux: Callable | None = None,
    distill: tuple | None = None,
):
    """Builds the pure ``train_step(state, batch)``; ``aux(params, out, batch, rng) ->
    (loss, metrics)`` adds a method's loss terms; ``distill = (teacher model, weight,
    temperature)`` adds ``weight * distillation_loss`` against the teacher whose parameters
    are ``state.extra['teacher']`` (its ``distill`` metric is summed over micro-batches)."""

    def loss_of(params, extra, batch, rng):
        return _forward_loss(model, family, task, params, extra, batch, rng, False, aux, distill)

    def grads_of(params, extra, batch, rng):
        fn = jax.value_and_grad(loss_of, has_aux=True)
        (loss, (loss_sum, count, metrics)), g = fn(params, extra, batch, rng)
        return g, loss, loss_sum, count, metrics

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_rng, state.step)
        if grad_accum == 1:
            g, _, loss_sum, count, metrics = grads_of(state.params, state.extra, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch
            )

            def body(carry, i_mb):
                i, mb = i_mb
                g, _, ls, n, m = grads_of(state.params, state.extra, mb, jax.random.fold_in(rng, i))
                acc_g, acc_ls, acc_n, acc_m = carry
                acc_g = jax.tree.map(lambda a, b: a + b * n, acc_g, g)
                acc_m = jax.tree.map(jnp.add, acc_m, m)
                return (acc_g, acc_ls + ls, acc_n + n, acc_m), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            m0 = jax.eval_shape(
                lambda: grads_of(
                    state.params, state.extra, jax.tree.map(lambda x: x[0], micro), rng
                )[4]
            )
            m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (g, loss_sum, count, metrics), _ = jax.lax.scan(
                body, (zeros, 0.0, 0.0, m0), (jnp.arange(grad_accum), micro)
            )
            g = jax.tree.map(lambda x: x / jnp.maximum(count, 1.0), g)
        grad_norm = optax.tree.norm(g)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            "loss": loss_sum / jnp.maximum(count, 1.0),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "count": count,
            **{k: v for k, v in metrics.items() if jnp.ndim(v) == 0},
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

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
