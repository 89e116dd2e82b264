"""Vectorized NumPy image augmentation (DeiT-style) for in-memory image sources.

All functions take images as (n,H,W,C) float32 and draw nothing themselves except where
an explicit ``np.random.Generator`` is passed, so callers control determinism.

- :func:`crop_resize`: bilinear crop-and-resize of per-image boxes to (n,S,S,C).
- :func:`random_resized_crop_boxes`: area in ``scale``, aspect ratio log-uniform in
  (3/4, 4/3); a box larger than the image is clipped to it (instead of re-drawn).
- :func:`center_boxes`: the eval box, a centered square of ``crop_pct * min(H, W)``.
- :func:`erase_boxes` / :func:`apply_erase`: random erasing (area (0.02, 1/3), aspect
  (0.3, 3.3), one attempt, per-pixel normal noise), as in timm's ``mode='pixel'``.
- :func:`draw_mix` / :func:`apply_mix` / :func:`soft_labels`: batch-level mixup/cutmix
  (one lambda per batch, partner = the batch reversed) and label smoothing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def crop_resize(images: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resample of boxes ``(n,4) [y0, x0, h, w]`` (pixels) of (n,H,W,C) to
    (n,size,size,C), sampling at pixel centers."""
    n, H, W, C = images.shape
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys = np.clip(boxes[:, :1] + t[None] * boxes[:, 2:3] - 0.5, 0, H - 1)  # (n,S)
    xs = np.clip(boxes[:, 1:2] + t[None] * boxes[:, 3:4] - 0.5, 0, W - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    wy = (ys - y0).astype(np.float32)[:, :, None, None]
    wx = (xs - x0).astype(np.float32)[:, None, :, None]
    top = np.take_along_axis(images, y0[:, :, None, None], axis=1)  # (n,S,W,C)
    bot = np.take_along_axis(images, y1[:, :, None, None], axis=1)
    rows = top * (1 - wy) + bot * wy
    left = np.take_along_axis(rows, x0[:, None, :, None], axis=2)  # (n,S,S,C)
    right = np.take_along_axis(rows, x1[:, None, :, None], axis=2)
    return (left * (1 - wx) + right * wx).astype(np.float32)


def full_boxes(n: int, H: int, W: int) -> np.ndarray:
    """(n,4) boxes covering the whole image."""
    return np.tile(np.asarray([[0, 0, H, W]], np.float32), (n, 1))


def center_boxes(n: int, H: int, W: int, crop_pct: float) -> np.ndarray:
    """(n,4) centered square boxes of side ``crop_pct * min(H, W)`` (resize + center crop)."""
    side = crop_pct * min(H, W)
    return np.tile(np.asarray([[(H - side) / 2, (W - side) / 2, side, side]], np.float32), (n, 1))


def random_resized_crop_boxes(
    rng: np.random.Generator, n: int, H: int, W: int, scale, ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """(n,4) random-resized-crop boxes (see module docstring)."""
    area = H * W * rng.uniform(scale[0], scale[1], n)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
    w = np.clip(np.sqrt(area * aspect), 1, W)
    h = np.clip(np.sqrt(area / aspect), 1, H)
    y0 = rng.random(n) * (H - h)
    x0 = rng.random(n) * (W - w)
    return np.stack([y0, x0, h, w], axis=1).astype(np.float32)


def erase_boxes(rng: np.random.Generator, n: int, H: int, W: int, prob: float) -> np.ndarray:
    """(n,4) int boxes ``[y0, x0, h, w]`` to erase; h = w = 0 where nothing is erased."""
    apply = rng.random(n) < prob
    area = H * W * rng.uniform(0.02, 1 / 3, n)
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), n))
    h = np.round(np.sqrt(area * aspect)).astype(np.int64)
    w = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = apply & (h < H) & (w < W) & (h > 0) & (w > 0)
    y0 = (rng.random(n) * np.maximum(H - h + 1, 1)).astype(np.int64)
    x0 = (rng.random(n) * np.maximum(W - w + 1, 1)).astype(np.int64)
    return np.where(ok[:, None], np.stack([y0, x0, h, w], axis=1), 0)


def apply_erase(images: np.ndarray, boxes: np.ndarray, noise_fn) -> np.ndarray:
    """Replace each box of (n,H,W,C) with ``noise_fn(i)`` (an (H,W,C) array) inside it."""
    out = images.copy()
    _, H, W, _ = images.shape
    yy, xx = np.arange(H)[:, None], np.arange(W)[None, :]
    for i in np.flatnonzero(boxes[:, 2] > 0):
        y0, x0, h, w = boxes[i]
        inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        out[i] = np.where(inside[:, :, None], noise_fn(i).astype(np.float32), out[i])
    return out


@dataclasses.dataclass(frozen=True)
class MixParams:
    """One batch's mixing: ``lam`` weight of the original image, optional cutmix box."""

    lam: float
    box: tuple[int, int, int, int] | None  # (y0, y1, x0, x1) pasted from the partner


def draw_mix(
    rng: np.random.Generator,
    H: int,
    W: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
) -> MixParams | None:
    """Mixing for one batch, or None when both alphas are 0 (timm ``mode='batch'``)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(
        rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha)
    )
    if not use_cutmix:
        return MixParams(lam, None)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
    return MixParams(lam, (y0, y1, x0, x1))


def apply_mix(images: np.ndarray, partners: np.ndarray, mix: MixParams) -> np.ndarray:
    """Mix (n,H,W,C) images with their partners (same shape)."""
    if mix.box is None:
        return (images * mix.lam + partners * (1.0 - mix.lam)).astype(np.float32)
    y0, y1, x0, x1 = mix.box
    out = images.copy()
    out[:, y0:y1, x0:x1] = partners[:, y0:y1, x0:x1]
    return out


def soft_labels(
    labels: np.ndarray,
    num_classes: int,
    smoothing: float,
    partner_labels: np.ndarray | None = None,
    lam: float = 1.0,
) -> np.ndarray:
    """(n,num_classes) float32 targets: smoothed one-hot, mixed with the partners' by lam."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def one_hot(y):
        out = np.full((len(y), num_classes), off, np.float32)
        out[np.arange(len(y)), y] = on
        return out

    soft = one_hot(labels)
    if partner_labels is not None:
        soft = soft * lam + one_hot(partner_labels) * (1.0 - lam)
    return soft.astype(np.float32)
