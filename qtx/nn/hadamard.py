"""Deterministic Hadamard transforms: the online transforms of a rotated decoder and the random
residual rotation of :mod:`qtx.methods.quarot` (docs/methods.md §5).

Constructions (``±1`` matrices ``H`` with ``H H^T = b I``, normalised by ``1/sqrt(b)``):

* Sylvester, order ``2^k``: ``H_1 = [1]``, ``H_{2n} = [[H_n, H_n], [H_n, -H_n]]``, so
  ``H_{2^k} = H_2 ⊗ ... ⊗ H_2``;
* Paley I, order ``m = q + 1`` for a prime ``q ≡ 3 (mod 4)``, ``m <= PALEY_MAX``:
  ``H = I + [[0, 1^T], [-1, Q]]`` with the Jacobsthal matrix ``Q_ij = χ(j - i)`` (``χ`` the
  Legendre symbol mod ``q``, ``χ(0) = 0``);
* Kronecker products ``H_m ⊗ H_{2^a}``.

:func:`hadamard_order` ``b(n)`` is the largest order ``2^a · m`` (``m`` 1 or a Paley order
that is not a power of two, the smallest such ``m`` on ties) dividing ``n``; the transform of
width ``n`` is the block-diagonal ``I_{n/b} ⊗ H_b`` (the full Hadamard matrix when ``b = n``),
orthogonal in every case. It is applied factor by factor (``H_m`` and Sylvester factors of at
most ``MAX_FACTOR``), never as an ``n x n`` matrix: ``O(n (m + sum of factors))`` per row.
Examples: ``b(128) = 128``, ``b(384) = 12 · 32``, ``b(768) = 12 · 64``, ``b(11008 = 256 · 43)
= 256``.

The PyTorch port shipped with exports (``qtx/hf/remote/hadamard_qtx.py``) builds the same
factors; tests check they are identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PALEY_MAX = 256  # largest Paley I order used (its dense factor costs m per element)
MAX_FACTOR = 128  # Sylvester factors are applied in blocks of at most this order


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


@functools.cache
def paley_orders() -> tuple[int, ...]:
    """Paley I orders ``q + 1 <= PALEY_MAX`` (q prime, ``q ≡ 3 mod 4``): 4, 8, 12, 20, ..."""
    return tuple(q + 1 for q in range(3, PALEY_MAX) if q % 4 == 3 and _is_prime(q))


@functools.cache
def hadamard_split(n: int) -> tuple[int, int]:
    """``(m, 2^a)`` with ``b = m · 2^a = hadamard_order(n)``; ``m`` 1 (Sylvester alone) or a
    Paley order that is not a power of two."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive width, got {n}.")
    best = (1, 1)
    for m in (1, *(p for p in paley_orders() if p & (p - 1))):
        if n % m:
            continue
        r = n // m
        two = r & -r  # the largest power of two dividing n / m
        if m * two > best[0] * best[1]:
            best = (m, two)
    return best


def hadamard_order(n: int) -> int:
    """The block order ``b`` of the width-``n`` transform (a divisor of ``n``, at least 1)."""
    m, two = hadamard_split(n)
    return m * two


def sylvester(order: int) -> np.ndarray:
    """The ``±1`` Sylvester matrix of ``order = 2^k`` (int64)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}.")
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


def paley(order: int) -> np.ndarray:
    """The ``±1`` Paley I matrix of ``order = q + 1`` (q prime, ``q ≡ 3 mod 4``; int64)."""
    q = order - 1
    if q % 4 != 3 or not _is_prime(q):
        raise ValueError(f"Paley I needs order q + 1 with q prime and q = 3 mod 4, got {order}.")
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if d in squares else -1 for d in range(1, q)], np.int64)
    idx = np.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Q_ij = chi(j - i), antisymmetric
    s = np.zeros((order, order), np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(order, dtype=np.int64)


@functools.cache
def hadamard_factors(n: int) -> tuple[np.ndarray, ...]:
    """The ``±1`` factors (int64) of ``H_b = F_1 ⊗ F_2 ⊗ ...`` for width ``n``: the Paley
    matrix (if any), then Sylvester matrices of order at most ``MAX_FACTOR``."""
    m, two = hadamard_split(n)
    out = [paley(m)] if m > 1 else []
    while two > 1:
        f = min(two, MAX_FACTOR)
        out.append(sylvester(f))
        two //= f
    return tuple(out) if out else (np.ones((1, 1), np.int64),)


def _apply(x, n: int, xp, contract):
    """``x`` (..., n) times ``I_{n/b} ⊗ H_b`` with the normalised factors of ``n``."""
    factors = hadamard_factors(n)
    sizes = [f.shape[0] for f in factors]
    b = int(np.prod(sizes))
    lead = x.shape[:-1]
    y = x.reshape(*lead, n // b, *sizes)
    for i, f in enumerate(factors):
        axis = len(lead) + 1 + i
        fn = xp.asarray(f / np.sqrt(f.shape[0]), dtype=y.dtype)
        y = xp.moveaxis(contract(y, fn, axis), -1, axis)
    return y.reshape(*lead, n)


def hadamard_numpy(x: np.ndarray) -> np.ndarray:
    """``x (I ⊗ H_b)`` over the last axis in NumPy float64 (weight rewrites)."""
    x = np.asarray(x, np.float64)
    return _apply(x, x.shape[-1], np, lambda y, f, ax: np.tensordot(y, f, axes=([ax], [0])))


def online_hadamard(x):
    """``x`` (..., n) -> ``x (I_{n/b} ⊗ H_b)`` in float32 (returned in ``x``'s dtype)."""
    dtype = x.dtype
    xf = jnp.asarray(x, jnp.float32)

    def contract(y, f, ax):
        return jnp.tensordot(y, f, axes=([ax], [0]), precision=jax.lax.Precision.HIGHEST)

    return _apply(xf, xf.shape[-1], jnp, contract).astype(dtype)


def hadamard_matrix(n: int) -> np.ndarray:
    """The normalised ``I_{n/b} ⊗ H_b`` (n, n) float64 (tests, reference)."""
    return hadamard_numpy(np.eye(n))


def random_signs(n: int, seed: int) -> np.ndarray:
    """The ``±1`` diagonal (n,) float64 of :func:`random_hadamard` with ``seed``."""
    return np.random.default_rng(int(seed)).integers(0, 2, n).astype(np.float64) * 2.0 - 1.0


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """QuaRot's randomised Hadamard ``Q = diag(s) (I_{n/b} ⊗ H_b)`` (n, n) float64, ``s``
    :func:`random_signs`; orthogonal (``Q Q^T = I``)."""
    return hadamard_numpy(np.diag(random_signs(n, seed)))
