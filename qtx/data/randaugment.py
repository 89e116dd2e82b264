"""RandAugment with timm's ``rand-...`` semantics on uint8-range images (NumPy side).

Spec (``config.data.randaugment``): ``'rand'`` then '-'-joined sections in any order:
``m<float>`` magnitude (default 10), ``n<int>`` ops per image (2), ``mstd<float>`` magnitude
noise std (0; above 100: uniform in [0, m]), ``mmax<float>`` magnitude ceiling (10),
``inc<0|1>`` the "increasing" op set (0), ``p<float>`` per-op probability (0.5).
DeiT uses ``rand-m9-mstd0.5-inc1``.

Per image and layer l < n: op k is drawn uniformly from the 15 ops of the set (with
replacement), applied with probability p, at magnitude M = clip(m + mstd * N(0,1), 0, mmax),
with a fair random sign s = +-1. With v = M / 10 the op parameter is:

======================== =================================================================
op                       parameter (and action)
======================== =================================================================
Rotate                   s * 30 v degrees about the image center
ShearX / ShearY          f = s * 0.3 v; x_in = x + f y / y_in = y + f x
TranslateXRel / YRel     s * 0.45 v * W (H) pixels; x_in = x + t / y_in = y + t
Posterize                b = floor(4 v) (Increasing: 4 - floor(4 v)); keep the b high bits
Solarize                 t = floor(256 v) (Increasing: 256 - t); x >= t -> 255 - x
SolarizeAdd              a = floor(110 v); x < 128 -> min(x + a, 255)
Color, Contrast,         f = 0.1 + 1.8 v (Increasing: max(0.1, 1 + 0.9 s v));
Brightness, Sharpness    out = trunc(clip(d + f (x - d), 0, 255)) with d the degenerate image
AutoContrast, Equalize,  no parameter: per-channel min/max stretch, histogram equalization
Invert                   (``PIL.ImageOps`` definitions), 255 - x
======================== =================================================================

Degenerate images: Color, luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (C=1: the
image); Contrast, the constant round(mean L); Brightness, 0; Sharpness, the 3x3 smoothing
[[1,1,1],[1,5,1],[1,1,1]] / 13 (rounded) with border pixels kept. Geometric ops map each
output pixel center (x+0.5, y+0.5) to an input point: outside the image it takes the fill
colour, inside a bilinear value with edge clamping, truncated (as ``PIL`` bilinear; timm's
DeiT resamples bicubic). The fill colour is round(255 * mean) of the dataset, as timm's
``create_transform`` passes it.

Images are (n,H,W,C) float32 holding integers in [0, 255]; every op returns the same, as a
uint8 ``PIL`` image would. :mod:`qtx.data.randaugment_tf` is the ``tf`` version of one image.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from qtx.errors import UserError

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
INCREASING_OPS = tuple(
    f"{op}Increasing"
    if op in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else op
    for op in OPS
)
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SPEC_FORM = (
    "'' (off) or 'rand' followed by '-'-joined sections m<magnitude>, n<ops per image>, "
    "mstd<std>, mmax<max magnitude>, inc<0|1>, p<probability> (e.g. 'rand-m9-mstd0.5-inc1')"
)
_SECTION = re.compile(r"^(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)$")


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` string (see the module docstring)."""

    num_ops: int = 2
    magnitude: float = 10.0
    mstd: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


def parse(text: str | None) -> RandAugmentSpec | None:
    """``'rand-m9-mstd0.5-inc1'`` -> :class:`RandAugmentSpec`; '' or None -> None (off).

    Raises :class:`UserError` naming ``config.data.randaugment`` for anything else."""
    if text is None or text == "":
        return None
    parts = text.split("-") if isinstance(text, str) else []
    if not parts or parts[0] != "rand":
        _bad(text)
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = _SECTION.match(part)
        if match is None or match.group(1) in values:
            _bad(text)
        values[match.group(1)] = float(match.group(2))
    n = values.get("n", 2.0)
    spec = RandAugmentSpec(
        num_ops=int(n),
        magnitude=values.get("m", 10.0),
        mstd=values.get("mstd", 0.0),
        magnitude_max=values.get("mmax", 10.0),
        increasing=bool(values.get("inc", 0.0)),
        prob=values.get("p", 0.5),
    )
    if n != int(n) or n < 1 or values.get("inc", 0.0) not in (0.0, 1.0):
        _bad(text)
    if spec.prob > 1 or spec.magnitude_max <= 0:
        _bad(text)
    return spec


def _bad(text) -> None:
    raise UserError(f"config.data.randaugment must be {SPEC_FORM}; got {text!r}.")


def fill_colour(mean) -> np.ndarray:
    """(C,) float32 fill of geometric ops: round(255 * mean), as timm's ``img_mean``."""
    return np.asarray([min(255, round(255 * float(m))) for m in mean], np.float32)


# ---------------------------------------------------------------- magnitudes and parameters


def noisy_magnitude(spec: RandAugmentSpec, u, z, xp):
    """M = clip(m + mstd z, 0, mmax), or u * m when mstd > 100 (u ~ U[0,1), z ~ N(0,1))."""
    if spec.mstd > 100:
        mag = u * spec.magnitude
    else:
        mag = spec.magnitude + spec.mstd * z
    return xp.minimum(xp.maximum(mag, 0.0), spec.magnitude_max)


def op_param(name: str, magnitude, sign, xp):
    """timm's magnitude -> parameter map of op ``name`` (float64 arrays/tensors in and out;
    ``xp`` is ``numpy`` or ``tf.math``)."""
    v = magnitude / 10.0
    if name == "Rotate":
        return sign * (v * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (v * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (v * 0.45)
    if name == "Posterize":
        return xp.floor(v * 4.0)
    if name == "PosterizeIncreasing":
        return 4.0 - xp.floor(v * 4.0)
    if name == "Solarize":
        return xp.floor(v * 256.0)
    if name == "SolarizeIncreasing":
        return 256.0 - xp.floor(v * 256.0)
    if name == "SolarizeAdd":
        return xp.floor(v * 110.0)
    if name in ENHANCE:
        return v * 1.8 + 0.1
    if name.endswith("Increasing"):  # the enhance ops
        return xp.maximum(1.0 + sign * (v * 0.9), 0.1)
    return 0.0 * v


def affine_coefficients(name: str, param, H: int, W: int, xp):
    """(a, b, c, d, e, f): output pixel center (X, Y) samples input (aX + bY + c, dX + eY + f)."""
    zero, one = 0.0 * param, 1.0 + 0.0 * param
    if name == "ShearX":
        return one, param, zero, zero, one, zero
    if name == "ShearY":
        return one, zero, zero, param, one, zero
    if name == "TranslateXRel":
        return one, zero, param * W, zero, one, zero
    if name == "TranslateYRel":
        return one, zero, zero, zero, one, param * H
    theta = param * (math.pi / 180.0)  # Rotate, about (W/2, H/2)
    cos, sin = xp.cos(theta), xp.sin(theta)
    cx, cy = W / 2.0, H / 2.0
    return cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy


# ---------------------------------------------------------------- NumPy ops on (n,H,W,C)


def _col(p) -> np.ndarray:
    return np.asarray(p, np.float64)[:, None, None, None]


def invert(x, p=None, fill=None):
    return 255.0 - x


def posterize(x, bits, fill=None):
    q = 2.0 ** (8.0 - np.clip(_col(bits), 0, 8))
    return (np.floor(x / q) * q).astype(np.float32)


def solarize(x, thresh, fill=None):
    return np.where(x >= _col(thresh), 255.0 - x, x).astype(np.float32)


def solarize_add(x, add, fill=None):
    return np.where(x < 128, np.minimum(x + _col(add), 255.0), x).astype(np.float32)


def autocontrast(x, p=None, fill=None):
    lo = x.min(axis=(1, 2), keepdims=True).astype(np.float64)
    hi = x.max(axis=(1, 2), keepdims=True).astype(np.float64)
    ok = hi > lo
    scale = 255.0 / np.where(ok, hi - lo, 1.0)
    out = np.floor(np.clip(x * scale + (-lo * scale), 0, 255))
    return np.where(ok, out, x).astype(np.float32)


def equalize(x, p=None, fill=None):
    n, H, W, C = x.shape
    xi = x.astype(np.int64)
    lane = (np.arange(n)[:, None] * C + np.arange(C)[None]) * 256  # (n,C)
    flat = (xi + lane[:, None, None, :]).ravel()
    hist = np.bincount(flat, minlength=n * C * 256).reshape(n, C, 256)
    last = hist[np.arange(n)[:, None], np.arange(C)[None], xi.max(axis=(1, 2))]  # (n,C)
    step = (H * W - last) // 255
    cum = np.cumsum(hist, axis=-1) - hist
    lut = np.minimum((step[..., None] // 2 + cum) // np.maximum(step, 1)[..., None], 255)
    lut = np.where(step[..., None] > 0, lut, np.arange(256))
    return lut.ravel()[flat].reshape(x.shape).astype(np.float32)


def luma(x):
    """(n,H,W,1) integer luma of (n,H,W,3), or the image itself when C=1."""
    if x.shape[-1] == 1:
        return x
    r, g, b = (x[..., k : k + 1].astype(np.int64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).astype(np.float32)


def blend(degenerate, x, factor):
    """trunc(clip(d + f (x - d), 0, 255)) in float32, as ``PIL.Image.blend``."""
    f = _col(factor).astype(np.float32)
    return np.floor(np.clip(degenerate + f * (x - degenerate), 0, 255)).astype(np.float32)


def color(x, factor, fill=None):
    return blend(np.broadcast_to(luma(x), x.shape), x, factor)


def contrast(x, factor, fill=None):
    mean = np.floor(luma(x).mean(axis=(1, 2, 3), dtype=np.float64) + 0.5)
    return blend(np.broadcast_to(_col(mean).astype(np.float32), x.shape), x, factor)


def brightness(x, factor, fill=None):
    return blend(np.zeros_like(x), x, factor)


def smooth(x):
    """3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border pixels unchanged."""
    H, W = x.shape[1:3]
    if H < 3 or W < 3:
        return x
    s = 4.0 * x[:, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + x[:, dy : H - 2 + dy, dx : W - 2 + dx]
    out = x.copy()
    out[:, 1:-1, 1:-1] = np.floor(s / 13.0 + 0.5)
    return out


def sharpness(x, factor, fill=None):
    return blend(smooth(x), x, factor)


def affine(x, coef, fill):
    """Resample (n,H,W,C) at per-image ``coef`` (6 arrays of shape (n,)); outside -> fill."""
    n, H, W, C = x.shape
    a, b, c, d, e, f = (np.asarray(k, np.float64)[:, None, None] for k in coef)
    X, Y = np.arange(W)[None, None, :] + 0.5, np.arange(H)[None, :, None] + 0.5
    xin, yin = a * X + b * Y + c, d * X + e * Y + f  # (n,H,W)
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    x0, y0 = np.floor(xin - 0.5), np.floor(yin - 0.5)
    dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]
    flat = x.reshape(n * H * W, C).astype(np.float64)
    base = np.arange(n)[:, None, None] * (H * W)

    def at(yy, xx):
        yy = np.clip(yy, 0, H - 1).astype(np.int64)
        xx = np.clip(xx, 0, W - 1).astype(np.int64)
        return flat[base + yy * W + xx]

    tl, tr, bl, br = at(y0, x0), at(y0, x0 + 1), at(y0 + 1, x0), at(y0 + 1, x0 + 1)
    top, bot = tl + (tr - tl) * dx, bl + (br - bl) * dx
    v = np.floor(top + (bot - top) * dy)
    return np.where(inside[..., None], v, np.asarray(fill, np.float64)).astype(np.float32)


def _geometric(name):
    def op(x, param, fill):
        return affine(x, affine_coefficients(name, param, x.shape[1], x.shape[2], np), fill)

    return op


KERNELS = {
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    **{name: _geometric(name) for name in GEOMETRIC},
}


def kernel(name: str):
    """The NumPy function ``(x (n,H,W,C), param (n,), fill (C,)) -> (n,H,W,C)`` of an op."""
    return KERNELS[name.removesuffix("Increasing")]


# ---------------------------------------------------------------- draws and application


@dataclasses.dataclass(frozen=True)
class Draw:
    """Random choices for n images: all (n, num_ops)."""

    ops: np.ndarray  # int op index into spec.ops
    apply: np.ndarray  # bool
    magnitude: np.ndarray  # float64, clipped
    sign: np.ndarray  # float64, +-1

    def rows(self, idx: np.ndarray) -> Draw:
        return Draw(self.ops[idx], self.apply[idx], self.magnitude[idx], self.sign[idx])


def draw(rng: np.random.Generator, n: int, spec: RandAugmentSpec) -> Draw:
    """Choices for n images from ``rng`` (one call; rows are independent)."""
    shape = (n, spec.num_ops)
    ops = rng.integers(0, len(spec.ops), shape)
    apply = rng.random(shape) < spec.prob
    u, z = rng.random(shape), rng.standard_normal(shape)
    sign = np.where(rng.random(shape) < 0.5, 1.0, -1.0)
    return Draw(ops, apply, noisy_magnitude(spec, u, z, np), sign)


def params(d: Draw, spec: RandAugmentSpec) -> np.ndarray:
    """(n, num_ops) float64 parameter of each chosen op."""
    table = np.stack([op_param(name, d.magnitude, d.sign, np) for name in spec.ops])
    return np.take_along_axis(table, d.ops[None], axis=0)[0]


def apply(images: np.ndarray, d: Draw, spec: RandAugmentSpec, fill) -> np.ndarray:
    """RandAugment of (n,H,W,C) integer-valued float32 images in [0, 255] by draw ``d``.

    Vectorized per op: each layer applies each op once to all the rows that chose it."""
    x = np.array(images, np.float32)
    p = params(d, spec)
    for layer in range(spec.num_ops):
        chosen = np.where(d.apply[:, layer], d.ops[:, layer], -1)
        for k in np.unique(chosen[chosen >= 0]):
            rows = np.flatnonzero(chosen == k)
            x[rows] = kernel(spec.ops[k])(x[rows], p[rows, layer], fill)
    return x


def to_uint8_range(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> integer-valued float32 in [0, 255] (rounded, as a uint8 image)."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.float32)
