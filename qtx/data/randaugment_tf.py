"""``tf`` RandAugment of one image inside a ``tf.data`` map (see :mod:`qtx.data.randaugment`).

Same ops, parameters, rounding and fill as the NumPy version, on one (H,W,C) float32 image
holding integers in [0, 255] with static H, W, C. The random choices come from stateless ops
seeded by a (2,) int64 seed, so an image's augmentation is a function of that seed only.
TensorFlow is passed in (``tf``), never imported here, to keep ``qtx.data`` imports light.
:func:`compiled` traces :func:`apply` once per (spec, shape, fill) and process, so the
per-epoch ``tf.data`` maps that call it do not trace it again.
"""

from __future__ import annotations

import functools

from qtx.data.randaugment import (
    GEOMETRIC,
    RandAugmentSpec,
    affine_coefficients,
    noisy_magnitude,
    op_param,
)


def _f64(tf, x):
    return tf.cast(x, tf.float64)


def _affine(tf, x, coef, fill):
    H, W, C = x.shape
    a, b, c, d, e, f = coef
    X = tf.range(W, dtype=tf.float64)[None, :] + 0.5
    Y = tf.range(H, dtype=tf.float64)[:, None] + 0.5
    xin, yin = a * X + b * Y + c, d * X + e * Y + f  # (H,W)
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    x0, y0 = tf.floor(xin - 0.5), tf.floor(yin - 0.5)
    dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]
    xs = tf.cast(tf.clip_by_value(tf.stack([x0, x0 + 1]), 0, W - 1), tf.int32)  # (2,H,W)
    ys = tf.cast(tf.clip_by_value(tf.stack([y0, y0 + 1]), 0, H - 1), tf.int32)
    g = tf.gather(tf.reshape(_f64(tf, x), [H * W, C]), ys[:, None] * W + xs[None])  # (2,2,H,W,C)
    top, bot = g[0, 0] + (g[0, 1] - g[0, 0]) * dx, g[1, 0] + (g[1, 1] - g[1, 0]) * dx
    v = tf.floor(top + (bot - top) * dy)
    fill = tf.constant(fill, tf.float64)
    return tf.cast(tf.where(inside[..., None], v, fill), tf.float32)


def _autocontrast(tf, x):
    xd = _f64(tf, x)
    lo = tf.reduce_min(xd, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(xd, axis=[0, 1], keepdims=True)
    ok = hi > lo
    scale = 255.0 / tf.where(ok, hi - lo, tf.ones_like(hi))
    out = tf.floor(tf.clip_by_value(xd * scale + (-lo * scale), 0.0, 255.0))
    return tf.cast(tf.where(ok, out, xd), tf.float32)


def _equalize(tf, x):
    H, W, C = x.shape
    xi = tf.cast(x, tf.int32)
    idx = xi + 256 * tf.range(C)  # (H,W,C): value + 256 c
    flat = tf.reshape(idx, [-1])
    hist = tf.reshape(tf.math.bincount(flat, minlength=256 * C, maxlength=256 * C), [C, 256])
    top = tf.reduce_max(tf.reshape(xi, [-1, C]), axis=0)  # (C,)
    last = tf.gather(hist, top, batch_dims=1)
    step = (H * W - last) // 255
    cum = tf.cumsum(hist, axis=1, exclusive=True)
    lut = tf.minimum((step[:, None] // 2 + cum) // tf.maximum(step, 1)[:, None], 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), idx), tf.float32)


def _luma(tf, x):
    if x.shape[-1] == 1:
        return x
    xi = tf.cast(x, tf.int32)
    y = (xi[..., :1] * 19595 + xi[..., 1:2] * 38470 + xi[..., 2:3] * 7471 + 32768) // 65536
    return tf.cast(y, tf.float32)


def _blend(tf, degenerate, x, factor):
    f = tf.cast(factor, tf.float32)
    return tf.floor(tf.clip_by_value(degenerate + f * (x - degenerate), 0.0, 255.0))


def _smooth(tf, x):
    H, W, _ = x.shape
    if H < 3 or W < 3:
        return x
    s = 4.0 * x[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + x[dy : H - 2 + dy, dx : W - 2 + dx]
    pad = [[1, 1], [1, 1], [0, 0]]
    inner = tf.pad(tf.ones_like(s, tf.bool), pad)
    return tf.where(inner, tf.pad(tf.floor(s / 13.0 + 0.5), pad), x)


def kernel(tf, name: str, x, p, fill):
    """Op ``name`` on one (H,W,C) image with float64 scalar parameter ``p``."""
    base = name.removesuffix("Increasing")
    if base in GEOMETRIC:
        H, W = x.shape[0], x.shape[1]
        return _affine(tf, x, affine_coefficients(base, p, H, W, tf.math), fill)
    if base == "AutoContrast":
        return _autocontrast(tf, x)
    if base == "Equalize":
        return _equalize(tf, x)
    if base == "Invert":
        return 255.0 - x
    xd = _f64(tf, x)
    if base == "Posterize":
        q = 2.0 ** (8.0 - tf.clip_by_value(p, 0.0, 8.0))
        return tf.cast(tf.floor(xd / q) * q, tf.float32)
    if base == "Solarize":
        return tf.cast(tf.where(xd >= p, 255.0 - xd, xd), tf.float32)
    if base == "SolarizeAdd":
        return tf.cast(tf.where(xd < 128, tf.minimum(xd + p, 255.0), xd), tf.float32)
    if base == "Color":
        degenerate = tf.broadcast_to(_luma(tf, x), tf.shape(x))
    elif base == "Contrast":
        mean = tf.floor(tf.reduce_mean(_f64(tf, _luma(tf, x))) + 0.5)
        degenerate = tf.fill(tf.shape(x), tf.cast(mean, tf.float32))
    elif base == "Brightness":
        degenerate = tf.zeros_like(x)
    elif base == "Sharpness":
        degenerate = _smooth(tf, x)
    else:
        raise KeyError(name)
    return _blend(tf, degenerate, x, p)


def draw(tf, seed, spec: RandAugmentSpec):
    """(ops int32, apply bool, magnitude f64, sign f64), each (num_ops,), from the stateless
    seeds ``(s0, s1)`` and ``(s0 + 1, s1)`` of ``seed = (s0, s1)``."""
    L, K = spec.num_ops, len(spec.ops)
    seed = tf.cast(seed, tf.int64)
    u = tf.random.stateless_uniform([4, L], seed=seed, dtype=tf.float64)
    z = tf.random.stateless_normal([L], seed=tf.stack([seed[0] + 1, seed[1]]), dtype=tf.float64)
    ops = tf.minimum(tf.cast(u[0] * K, tf.int32), K - 1)
    sign = tf.where(u[3] < 0.5, tf.constant(1.0, tf.float64), -1.0)
    return ops, u[1] < spec.prob, noisy_magnitude(spec, u[2], z, tf.math), sign


def apply(tf, img, seed, spec: RandAugmentSpec, fill):
    """RandAugment of one (H,W,C) float32 image in [0, 255] with a (2,) int seed.

    The layers run in a ``tf.while_loop`` whose body switches over the non-geometric ops
    and one shared affine branch (the geometric ops differ only in their coefficients)."""
    ops, applied, magnitude, sign = draw(tf, seed, spec)
    names, (H, W, _) = spec.ops, img.shape
    plain = [n for n in names if n not in GEOMETRIC]
    geo = [n for n in names if n in GEOMETRIC]
    # switch branch of each op: plain ops in order, then the affine branch, then identity
    branch_of = tf.constant([plain.index(n) if n in plain else len(plain) for n in names])
    geo_row = tf.constant([geo.index(n) if n in geo else 0 for n in names])

    def body(layer, x):
        k = ops[layer]
        p = tf.gather(
            tf.stack([op_param(n, magnitude[layer], sign[layer], tf.math) for n in names]), k
        )
        coef = tf.stack([tf.stack(affine_coefficients(n, p, H, W, tf.math)) for n in geo])
        coef = tf.unstack(tf.gather(coef, tf.gather(geo_row, k)))
        branches = [(lambda n=n: kernel(tf, n, x, p, fill)) for n in plain]
        branches += [lambda: _affine(tf, x, coef, fill), lambda: x]
        index = tf.where(applied[layer], tf.gather(branch_of, k), len(branches) - 1)
        out = tf.switch_case(index, branches)
        out.set_shape(x.shape)
        return layer + 1, out

    return tf.while_loop(lambda layer, _: layer < spec.num_ops, body, (tf.constant(0), img))[1]


@functools.lru_cache(maxsize=8)
def _compiled(tf, spec: RandAugmentSpec, shape: tuple[int, ...], fill: tuple[float, ...]):
    signature = [tf.TensorSpec(shape, tf.float32), tf.TensorSpec([2], tf.int64)]
    fn = tf.function(lambda img, seed: apply(tf, img, seed, spec, fill), autograph=False)
    return fn.get_concrete_function(*signature)


def compiled(tf, spec: RandAugmentSpec, shape, fill):
    """Traced ``apply``: ``(img (H,W,C) float32, seed (2,) int64) -> (H,W,C) float32``."""
    return _compiled(tf, spec, tuple(int(d) for d in shape), tuple(float(f) for f in fill))
