"""Differentiable building blocks whose backward pass is written out for XLA.

XLA:CPU compiles ``jax.grad`` of a transformer well except in two places, which these
functions fix without changing any value:

* :func:`dense_dot`: ``y = x @ W`` with ``x`` (..., K), ``W`` (K, N). Autodiff writes the
  weight gradient as ``x^T g``; XLA:CPU then transposes ``g`` for the dot and fuses that
  transpose with whatever produced ``g``. In a residual network ``g`` is the sum of every
  later layer's LayerNorm backward, so each layer re-evaluated that whole chain (quadratic
  in depth: a third of the backward pass of a 12-layer model). Here the gradient is
  ``(g^T x)^T``: the dot reads ``g`` as it is and the transposed operand is ``x``, a local
  value. Dense layers and the patch embedding use it (ViT's patch embedding had the same
  problem: its gradient is the residual stream's).
* :func:`softmax_last`: ``softmax(s)`` over the last axis whose VJP is the closed form
  ``p * (g - sum(g * p))`` from the saved output, one fused pass instead of the exp/sum/div
  chain's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def dense_dot(x, w):
    """``x (..., K) @ w (K, N) -> (..., N)`` (same dtype); see the module docstring."""
    return jnp.dot(x, w)


def _dense_dot_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _dense_dot_bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw_t = jax.lax.dot_general(g2, x2, (((0,), (0,)), ((), ())))  # (N, K)
    return dx.astype(x.dtype), dw_t.T.astype(w.dtype)


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


@jax.custom_vjp
def softmax_last(s):
    """``exp(s - max) / sum(exp(s - max))`` over the last axis, float32 in and out."""
    return _softmax(s)


def _softmax(s):
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(s):
    p = _softmax(s)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_last.defvjp(_softmax_fwd, _softmax_bwd)
