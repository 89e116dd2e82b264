"""The online Hadamard transform of qtx's rotated decoders in PyTorch, shipped next to
``modeling_qtx.py`` (the same construction as qtx's ``qtx/nn/hadamard.py``, entry for entry).

A rotated export (``config.qtx_online_hadamard``) multiplies the o_proj input (the attention
context, width H·Dh) and the down_proj input (width F) by ``I_{n/b} ⊗ H_b``; the kernels hold
the inverse in their rows, and the random rotation of the residual stream is in the weights.

``H_b = F_1 ⊗ F_2 ⊗ ...``, normalised factors: a Paley I matrix of order ``m = q + 1`` (q
prime, ``q ≡ 3 mod 4``, ``m <= 256``, ``m`` not a power of two) when one divides the width,
then Sylvester matrices of order at most 128; ``b = m · 2^a`` is the largest such order
dividing the width (the smallest ``m`` on ties). Paley I: ``I + [[0, 1^T], [-1, Q]]``,
``Q_ij = χ(j - i)`` the Legendre symbol mod q. Sylvester: ``[[H, H], [H, -H]]``.
"""

import functools
import math

import torch

PALEY_MAX = 256
MAX_FACTOR = 128


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


@functools.cache
def paley_orders() -> tuple:
    return tuple(q + 1 for q in range(3, PALEY_MAX) if q % 4 == 3 and _is_prime(q))


@functools.cache
def hadamard_split(n: int) -> tuple:
    """``(m, 2^a)``: the Paley order (1: none) and the power of two of the block order."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive width, got {n}.")
    best = (1, 1)
    for m in (1, *(p for p in paley_orders() if p & (p - 1))):
        if n % m:
            continue
        r = n // m
        two = r & -r
        if m * two > best[0] * best[1]:
            best = (m, two)
    return best


def sylvester(order: int) -> torch.Tensor:
    """The ``±1`` Sylvester matrix of ``order = 2^k`` (int64)."""
    h = torch.ones((1, 1), dtype=torch.int64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(order: int) -> torch.Tensor:
    """The ``±1`` Paley I matrix of ``order = q + 1`` (int64)."""
    q = order - 1
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros((order, order), dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + torch.eye(order, dtype=torch.int64)


@functools.cache
def hadamard_factors(n: int) -> tuple:
    """The ``±1`` factors (int64) of ``H_b`` for width ``n``."""
    m, two = hadamard_split(n)
    out = [paley(m)] if m > 1 else []
    while two > 1:
        f = min(two, MAX_FACTOR)
        out.append(sylvester(f))
        two //= f
    return tuple(out) if out else (torch.ones((1, 1), dtype=torch.int64),)


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n) -> ``x (I_{n/b} ⊗ H_b)``, computed in float32, in ``x``'s dtype."""
    n, lead = x.shape[-1], x.shape[:-1]
    factors = hadamard_factors(n)
    sizes = [f.shape[0] for f in factors]
    b = math.prod(sizes)
    y = x.float().reshape(*lead, n // b, *sizes)
    for i, f in enumerate(factors):
        axis = len(lead) + 1 + i
        fn = (f.double() / math.sqrt(f.shape[0])).to(device=x.device, dtype=torch.float32)
        y = torch.movedim(torch.tensordot(y, fn, dims=([axis], [0])), -1, axis)
    return y.reshape(*lead, n).to(x.dtype)


def hadamard_input_hook(module, args, kwargs):
    """Forward pre-hook: the module's tensor input times the online Hadamard transform."""
    if args:
        return (online_hadamard(args[0]), *args[1:]), kwargs
    key = next(k for k in ("input", "hidden_states", "x") if k in kwargs)
    return args, {**kwargs, key: online_hadamard(kwargs[key])}
