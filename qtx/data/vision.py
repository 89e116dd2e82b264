"""Image classification pipelines (task ``image``).

Sources (``config.data.name``):

============= ============================================ ==============================
name          data                                         train / eval
============= ============================================ ==============================
digits        sklearn ``load_digits`` (8x8x1, /16 to [0,1]) first 1500 / last 297
mnist_local   ``<local_dir>/mnist/t10k-*-ubyte.gz`` (the    first 9000 / last 1000
              MNIST *test* set, IDX; 28x28x1)
mnist         TFDS ``mnist``                                train / test
cifar10       TFDS ``cifar10``                              train / test
imagenette    TFDS ``imagenette/full-size-v2``              train / validation
imagenet2012  TFDS ``imagenet2012`` (manual download)       train / validation
============= ============================================ ==============================

``mnist_local`` falls back to ``digits`` (with a logged warning) when its files are absent.
``holdout`` (in-memory sources) sets how many of the last images are held out for
evaluation instead (e.g. 3000 of MNIST's 10000 for a tighter accuracy estimate).

Preprocessing. Train: random-resized crop to ``image_size`` when a crop scale applies
(``crop_scale``; default (0.08, 1) for ImageNet-family, (0.35, 1) for CIFAR-10, none for
digits/MNIST, which are only resized), horizontal flip (``hflip``; off for digits/MNIST),
RandAugment (``randaugment``, e.g. DeiT's ``'rand-m9-mstd0.5-inc1'``; on the image rounded
to [0, 255], see :mod:`qtx.data.randaugment`), normalization with the dataset mean/std,
random erasing (``random_erase``), then batch-level
mixup/cutmix (``mixup_alpha``, ``cutmix_alpha``, ``mix_switch_prob``) and label smoothing,
which add ``label_soft`` (B,K). Eval/calibration: centered square crop of ``crop_pct`` of the
shorter side (0.875 ImageNet-family, else 1.0) resized to ``image_size``, normalized.
Grayscale sources give C=1, or C=3 (repeated) with ``channels=3``.

Repeated augmentation (``repeated_aug`` r > 1, DeiT's RASampler with r = 3): each epoch's
permutation is repeated r times per entry, so a batch holds r differently augmented copies
of each image and an epoch of ``N // B`` steps sees about N / r distinct images; process k
of p then keeps global rows ``k, k + p, ...`` instead of a block (see
:mod:`qtx.data.batching`), so its shards concatenate to a fixed permutation of the global
batch (the same multiset).

In-memory sources (digits, mnist_local) use :mod:`qtx.data.augment` and
:mod:`qtx.data.randaugment` (NumPy); every random draw is seeded by ``(seed, step)`` at the
global batch size, and the mixing partner of global row i is row B-1-i, so process shards
concatenate to the global batch. TFDS sources use ``tf.image`` (see
:mod:`qtx.data.vision_tfds`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import logging
from collections.abc import Iterator

import numpy as np

from qtx.data import augment, batching, randaugment
from qtx.data.base import Batch, Pipeline, local_rows
from qtx.data.config import DataSpec, resolve_local_dir
from qtx.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """Static facts about an image source."""

    size: int  # native (or default output) side
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] | None
    hflip: bool
    crop_pct: float
    tfds: tuple[str, str, str] | None = None  # (name, train split, eval split)
    train_size: int = 0  # in-memory split point


INFO = {
    "digits": ImageInfo(8, 1, 10, (0.3051,), (0.3750,), None, False, 1.0, train_size=1500),
    "mnist_local": ImageInfo(28, 1, 10, (0.1307,), (0.3081,), None, False, 1.0, train_size=9000),
    "mnist": ImageInfo(
        28, 1, 10, (0.1307,), (0.3081,), None, False, 1.0, ("mnist", "train", "test")
    ),
    "cifar10": ImageInfo(
        32,
        3,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        (0.35, 1.0),
        True,
        1.0,
        ("cifar10", "train", "test"),
    ),
    "imagenette": ImageInfo(
        224,
        3,
        10,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (0.08, 1.0),
        True,
        0.875,
        ("imagenette/full-size-v2", "train", "validation"),
    ),
    "imagenet2012": ImageInfo(
        224,
        3,
        1000,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (0.08, 1.0),
        True,
        0.875,
        ("imagenet2012", "train", "validation"),
    ),
}


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """``config.data`` image fields with per-dataset defaults filled in."""

    size: int
    channels: int
    crop_scale: tuple[float, float] | None
    hflip: bool
    crop_pct: float
    mean: np.ndarray  # (C_out,) float32
    std: np.ndarray

    @staticmethod
    def resolve(spec: DataSpec, info: ImageInfo) -> ImageSettings:
        channels = spec.channels or info.channels
        if channels < info.channels:
            raise UserError(
                f"config.data.channels=1 needs a grayscale source; config.data.name="
                f"{spec.name!r} is RGB, so use 3 or None."
            )
        reps = channels // len(info.mean)
        return ImageSettings(
            size=spec.image_size or info.size,
            channels=channels,
            crop_scale=spec.crop_scale or info.crop_scale,
            hflip=info.hflip if spec.hflip is None else spec.hflip,
            crop_pct=spec.crop_pct or info.crop_pct,
            mean=np.tile(np.asarray(info.mean, np.float32), reps),
            std=np.tile(np.asarray(info.std, np.float32), reps),
        )


def read_idx(path) -> np.ndarray:
    """Array stored in an IDX file (optionally gzipped): uint8 data of any rank."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(np.int64)
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


@functools.lru_cache(maxsize=2)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: (1797,8,8,1) float32 in [0,1] and (1797,) int32 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


@functools.lru_cache(maxsize=2)
def load_mnist_arrays(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test set from IDX files: (10000,28,28,1) uint8 and (10000,) int32 labels."""
    images = read_idx(f"{folder}/t10k-images-idx3-ubyte.gz")[..., None]
    labels = read_idx(f"{folder}/t10k-labels-idx1-ubyte.gz").astype(np.int32)
    return images, labels


def _mnist_folder(spec: DataSpec) -> str | None:
    root = resolve_local_dir(spec.local_dir)
    if root is None:
        return None
    folder = root / "mnist"
    files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return str(folder) if all((folder / f).is_file() for f in files) else None


def in_memory_source(spec: DataSpec) -> tuple[str, np.ndarray, np.ndarray]:
    """(source actually used, images (N,H,W,C), labels (N,)) for digits / mnist_local."""
    if spec.name == "mnist_local":
        folder = _mnist_folder(spec)
        if folder is not None:
            return "mnist_local", *load_mnist_arrays(folder)
        logging.getLogger(__name__).warning(
            "config.data.name='mnist_local' found no MNIST IDX files under "
            "config.data.local_dir (or $QTX_DATA_DIR, ../shared/data); using 'digits'."
        )
    return "digits", *load_digits_arrays()


def _to_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def _finish(x: np.ndarray, st: ImageSettings) -> np.ndarray:
    """Repeat grayscale to ``st.channels`` and normalize: (n,S,S,C) float32."""
    if x.shape[-1] != st.channels:
        x = np.repeat(x, st.channels // x.shape[-1], axis=-1)
    return ((x - st.mean) / st.std).astype(np.float32)


def _eval_images(images: np.ndarray, st: ImageSettings) -> np.ndarray:
    n, H, W, _ = images.shape
    boxes = augment.center_boxes(n, H, W, st.crop_pct)
    return _finish(augment.crop_resize(_to_float(images), boxes, st.size), st)


def build_image_pipeline(spec: DataSpec) -> Pipeline:
    """Pipeline for task image (see the module docstring)."""
    info = INFO[spec.name]
    if info.tfds is not None:
        st = ImageSettings.resolve(spec, info)
        from qtx.data.vision_tfds import build_tfds_image_pipeline

        return build_tfds_image_pipeline(spec, info, st)
    source, images, labels = in_memory_source(spec)
    info = INFO[source]
    st = ImageSettings.resolve(spec, info)
    split = info.train_size
    if spec.holdout is not None:
        if spec.holdout >= len(images):
            raise UserError(
                f"config.data.holdout={spec.holdout} leaves no training images of the "
                f"{len(images)} in {source}; allowed: 1 to {len(images) - 1}."
            )
        split = len(images) - spec.holdout
    train_x, train_y = images[:split], labels[:split]
    eval_x, eval_y = images[split:], labels[split:]
    n, H, W = len(train_x), images.shape[1], images.shape[2]
    B, reps = spec.batch_size, spec.repeated_aug
    mine = batching.shard_rows(B, spec.process_index, spec.process_count, reps > 1)
    steps = batching.steps_per_epoch(n, B, f"config.data.name={spec.name!r}")
    K, S = info.num_classes, st.size
    soft = spec.mixing or spec.label_smoothing > 0
    ra, fill = randaugment.parse(spec.randaugment), randaugment.fill_colour(info.mean)

    def train_batch(step: int) -> Batch:
        idx = batching.train_indices(n, B, spec.seed, step, reps)
        rng = batching.rng_for(spec.seed, batching.AUGMENT, step)
        if st.crop_scale is not None:
            boxes = augment.random_resized_crop_boxes(rng, B, H, W, st.crop_scale)
        else:
            boxes = augment.full_boxes(B, H, W)
        flips = rng.random(B) < 0.5 if st.hflip else np.zeros(B, bool)
        erase = augment.erase_boxes(rng, B, S, S, spec.random_erase)
        mix = augment.draw_mix(rng, S, S, spec.mixup_alpha, spec.cutmix_alpha, spec.mix_switch_prob)
        need = mine if mix is None else np.union1d(mine, B - 1 - mine)
        x = augment.crop_resize(_to_float(train_x[idx[need]]), boxes[need], S)
        x = np.where(flips[need][:, None, None, None], x[:, :, ::-1], x)
        if ra is not None:
            draw = randaugment.draw(batching.rng_for(spec.seed, batching.RANDAUG, step), B, ra)
            x = randaugment.apply(randaugment.to_uint8_range(x), draw.rows(need), ra, fill)
            x = x / np.float32(255.0)
        x = _finish(x, st)
        if spec.random_erase > 0:

            def noise(i: int) -> np.ndarray:
                row = int(need[i])
                gen = batching.rng_for(spec.seed, batching.ERASE, step, row)
                return gen.standard_normal((S, S, st.channels), dtype=np.float32)

            x = augment.apply_erase(x, erase[need], noise)
        pos = np.searchsorted(need, mine)
        batch = {"image": x[pos], "label": train_y[idx[mine]]}
        if mix is not None:
            partner = np.searchsorted(need, B - 1 - mine)
            batch["image"] = augment.apply_mix(batch["image"], x[partner], mix)
            batch["label_soft"] = augment.soft_labels(
                batch["label"], K, spec.label_smoothing, train_y[idx[B - 1 - mine]], mix.lam
            )
        elif soft:
            batch["label_soft"] = augment.soft_labels(batch["label"], K, spec.label_smoothing)
        return batch

    def train(start_step: int) -> Iterator[Batch]:
        return (train_batch(step) for step in itertools.count(start_step))

    def evaluate(limit: int | None) -> Iterator[Batch]:
        Be = spec.eval_batch_size
        make = lambda idx: {"image": _eval_images(eval_x[idx], st), "label": eval_y[idx]}
        for lo, hi in batching.eval_slices(len(eval_y), Be, limit):
            batch = batching.padded_eval_batch(make, np.arange(lo, hi), Be, {})
            yield batching.local(batch, local_rows(Be, spec))

    def calib(num: int, size: int) -> list[Batch]:
        idx = batching.calib_indices(n, num * size, spec.seed)
        out = []
        for b in range(num):
            sel = idx[b * size : (b + 1) * size][local_rows(size, spec)]
            out.append({"image": _eval_images(train_x[sel], st), "label": train_y[sel]})
        return out

    return Pipeline(
        task="image",
        vocab_size=None,
        pad_id=None,
        num_classes=K,
        tokenizer=None,
        special_token_ids=np.zeros((0,), np.int32),
        steps_per_epoch=steps,
        spec=spec,
        _train=train,
        _eval=evaluate,
        _calib=calib,
    )
