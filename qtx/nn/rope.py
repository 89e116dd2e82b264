"""Rotary position embeddings (RoPE), as LLaMA / Qwen / Hugging Face compute them.

Inverse frequencies of the ``R`` rotated dims of a head (``R = head_dim * partial_rotary_factor``
rounded down to even): ``inv_freq_j = theta^(-2j / R)``, ``j < R / 2``. Llama-3 scaling
(``(factor, low_freq_factor, high_freq_factor, original_max_positions)``) divides the
frequencies whose wavelength ``2 pi / inv_freq`` exceeds ``original / low`` by ``factor``, keeps
those below ``original / high`` and interpolates in between::

    smooth = (original / wavelength - low) / (high - low)
    inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq

Tables ``cos``, ``sin`` (B, T, R) hold ``angle = position * inv_freq`` twice
(``concat(angle, angle)``), and a head ``x`` (..., Dh) becomes, on its first R dims,
``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``; the other dims pass.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rotary_dims(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """``R``: the rotated dims of a head, even (``int(head_dim * factor)`` rounded down)."""
    r = int(head_dim * partial_rotary_factor)
    return r - r % 2


def inv_frequencies(
    head_dim: int,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
    scaling: tuple | None = None,
) -> np.ndarray:
    """float32 (R / 2,) inverse frequencies (module docstring), computed in float64."""
    r = rotary_dims(head_dim, partial_rotary_factor)
    inv = 1.0 / (theta ** (np.arange(0, r, 2, dtype=np.int64).astype(np.float64) / r))
    if scaling is not None:
        factor, low, high, original = (float(v) for v in scaling)
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > original / low, inv / factor, inv)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions, inv_freq):
    """``(cos, sin)`` float32 (B, T, R) of integer ``positions`` (B, T)."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
    """Rotates the first R dims of every head of ``x`` (B, T, H, Dh) by the tables (B, T, R);
    float32 result."""
    r = cos.shape[-1]
    x = x.astype(jnp.float32)
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
