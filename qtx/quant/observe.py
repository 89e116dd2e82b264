"""Per-sequence outlier statistics of a tensor (Quantizable Transformers' metrics).

For one sequence (index ``b`` of the leading axis) all remaining elements are pooled:

* kurtosis ``= mean((x - mu)^4) / (s^4 + 1e-6)``, ``s`` the unbiased standard deviation
  (non-excess: a Gaussian gives about 3);
* inf norm ``= max |x|``.
"""

from __future__ import annotations

import jax.numpy as jnp


def kurtosis_per_sequence(x):
    """``x``: (B, ...) -> (B,) float32 non-excess kurtosis with the unbiased std."""
    x = x.astype(jnp.float32).reshape(x.shape[0], -1)
    n = x.shape[1]
    mu = x.mean(axis=1, keepdims=True)
    d = x - mu
    m4 = jnp.mean(d**4, axis=1)
    var = jnp.sum(d**2, axis=1) / max(n - 1, 1)
    return m4 / (var**2 + 1e-6)


def inf_norm_per_sequence(x):
    """``x``: (B, ...) -> (B,) float32 ``max |x|`` per sequence."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
