"""Per-sequence outlier statistics of a tensor (Quantizable Transformers' metrics).

For one sequence (index ``b`` of the leading axis) all remaining elements of its real tokens
are pooled (a token mask, when the model has one, leaves the padding out):

* kurtosis ``= mean((x - mu)^4) / max(s^4, tiny)``, ``s`` the unbiased standard deviation
  (non-excess: a Gaussian gives about 3), ``tiny`` the smallest normal float32, so a
  constant sequence gives 0. The Quantizable Transformers reference divides by
  ``s^4 + 1e-6``, which is not scale-free (a Gaussian of std 0.03 gives 1.4, of std 0.01
  gives 0.03); at the papers' activation scales (``s`` of order 1 and above) the two agree
  to within 1e-6 relative;
* inf norm ``= max |x|``.
"""

from __future__ import annotations

import jax.numpy as jnp

from qtx.errors import UserError


def broadcast_mask(mask, shape: tuple[int, ...]):
    """A token mask over the leading axes of ``shape`` ((B, T), or (B, 1, T, S) for attention
    maps; any dtype) as a bool array of ``shape``: trailing axes are added, then broadcast."""
    mask = jnp.asarray(mask, bool)
    if mask.ndim > len(shape):
        raise UserError(
            f"a token mask of shape {tuple(mask.shape)} has more axes than its activation "
            f"{tuple(shape)}; allowed: the activation's leading axes, e.g. (B, T)."
        )
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return jnp.broadcast_to(mask, shape)


def _flat(x, mask):
    """(B, n) float32 values and (B, n) bool real elements (None: all)."""
    flat = lambda a: a.reshape(x.shape[0], -1)  # noqa: E731
    return flat(x.astype(jnp.float32)), None if mask is None else flat(
        broadcast_mask(mask, x.shape)
    )


def kurtosis_per_sequence(x, mask=None):
    """``x``: (B, ...) -> (B,) float32 non-excess kurtosis with the unbiased std, over the
    elements where ``mask`` (leading axes of ``x``, True at real tokens; None = all)."""
    x, m = _flat(x, mask)
    n = jnp.full((x.shape[0],), x.shape[1], jnp.float32) if m is None else m.sum(axis=1)
    mu = jnp.sum(x if m is None else jnp.where(m, x, 0.0), axis=1, keepdims=True)
    mu = mu / jnp.maximum(n, 1.0)[:, None]
    d = x - mu if m is None else jnp.where(m, x - mu, 0.0)
    m4 = jnp.sum(d**4, axis=1) / jnp.maximum(n, 1.0)
    var = jnp.sum(d**2, axis=1) / jnp.maximum(n - 1.0, 1.0)
    return m4 / jnp.maximum(var**2, jnp.finfo(jnp.float32).tiny)


def inf_norm_per_sequence(x, mask=None):
    """``x``: (B, ...) -> (B,) float32 ``max |x|`` per sequence (real tokens only)."""
    x, m = _flat(x, mask)
    a = jnp.abs(x) if m is None else jnp.where(m, jnp.abs(x), 0.0)
    return jnp.max(a, axis=1)
