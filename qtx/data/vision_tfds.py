"""TFDS image pipelines (mnist, cifar10, imagenette, imagenet2012) with ``tf.image``.

Order: each epoch e reads the train split with file order and a shuffle buffer of
``shuffle_buffer`` examples seeded by ``(seed, e)``; an epoch has ``N // B`` global steps
(remainder dropped). Example i of epoch e is augmented with stateless ops seeded by
``(seed, e, i)``, so ``train_iterator(start_step=s)`` rebuilds epoch ``s // steps_per_epoch``
and skips ``(s % steps_per_epoch) * B`` raw records (no decoding: cheap, at most one epoch).

RandAugment (``randaugment``) runs after crop and flip on the rounded [0, 255] image, seeded
by ``(seed, e, i)`` too (:mod:`qtx.data.randaugment_tf`). Repeated augmentation
(``repeated_aug`` r > 1) repeats each shuffled record r times in a row before ``take``, so
copies get different indices i, hence different augmentations, an epoch keeps its
``N // B`` steps (about N / r distinct images) and a resume skips repeated records.

Sharding: records stay encoded until each process keeps its rows ``[lo, hi)`` of every
global batch (rows ``k, k + p, ...`` of process k of p with repeated augmentation, as
:func:`qtx.data.batching.shard_rows`), so only local images are decoded. Mixup/cutmix run
in NumPy on the local batch, seeded by ``(seed, step, process_index)``, pairing row i with
the reversed local batch (as timm does per device): with mixing on, shards differ from a
single-process batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from qtx.data import augment, batching, randaugment, randaugment_tf, tfds_sources
from qtx.data.base import Batch, Pipeline, local_rows
from qtx.data.config import DataSpec


def _seed_pair(*parts: int) -> int:
    """Fold ints into one 31-bit seed (tf shuffle seeds are Python ints)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def _decode(tf, raw, channels: int):
    img = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    img.set_shape([None, None, channels])
    return tf.cast(img, tf.float32) / 255.0


def _finish(tf, img, st):
    if st.channels != img.shape[-1]:
        img = tf.repeat(img, st.channels // img.shape[-1], axis=-1)
    return (img - tf.constant(st.mean)) / tf.constant(st.std)


def _train_image(tf, raw, seed, st, info, erase_p: float, ra=None, fill=None):
    """Decode + random-resized crop + flip + RandAugment (``ra``, a
    :class:`~qtx.data.randaugment.RandAugmentSpec` or None) + normalize + random erase."""
    img = _decode(tf, raw, info.channels)
    seeds = [tf.stack([seed[0] + k, seed[1]]) for k in range(5)]
    if st.crop_scale is not None:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(img),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seeds[0],
            area_range=st.crop_scale,
            aspect_ratio_range=(3 / 4, 4 / 3),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        img = tf.slice(img, begin, size)
        img.set_shape([None, None, info.channels])  # the slice loses the static channels
    img = tf.image.resize(img, (st.size, st.size), method="bilinear", antialias=True)
    if st.hflip:
        img = tf.image.stateless_random_flip_left_right(img, seed=seeds[1])
    if ra is not None:  # seeds[4] and (seed[0] + 5, seed[1])
        img = tf.round(tf.clip_by_value(img, 0.0, 1.0) * 255.0)
        img = randaugment_tf.compiled(tf, ra, img.shape, fill)(img, seeds[4]) / 255.0
    img = _finish(tf, img, st)
    if erase_p > 0:
        img = _erase(tf, img, seeds[2], seeds[3], erase_p, st)
    return img


def _erase(tf, img, seed_a, seed_b, prob: float, st):
    """Random erasing (area (0.02, 1/3), aspect (0.3, 3.3), one attempt, normal noise)."""
    S = st.size
    u = tf.random.stateless_uniform([5], seed=seed_a)
    area = S * S * (0.02 + u[1] * (1 / 3 - 0.02))
    aspect = tf.exp(np.log(0.3) + u[2] * (np.log(1 / 0.3) - np.log(0.3)))
    h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    ok = (u[0] < prob) & (h < S) & (w < S) & (h > 0) & (w > 0)
    y0 = tf.cast(u[3] * tf.cast(S - h + 1, tf.float32), tf.int32)
    x0 = tf.cast(u[4] * tf.cast(S - w + 1, tf.float32), tf.int32)
    yy, xx = tf.range(S)[:, None], tf.range(S)[None, :]
    inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w) & ok
    noise = tf.random.stateless_normal([S, S, st.channels], seed=seed_b)
    return tf.where(inside[:, :, None], noise, img)


def _eval_image(tf, raw, st, info):
    """Decode, resize the shorter side to size/crop_pct, center crop size, normalize."""
    img = _decode(tf, raw, info.channels)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    scale = (st.size / st.crop_pct) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    new = tf.maximum(new, st.size)
    img = tf.image.resize(img, new, method="bilinear", antialias=True)
    top, left = (new[0] - st.size) // 2, (new[1] - st.size) // 2
    img = img[top : top + st.size, left : left + st.size]
    img.set_shape([st.size, st.size, info.channels])
    return _finish(tf, img, st)


def build_tfds_image_pipeline(spec: DataSpec, info, st) -> Pipeline:
    """Pipeline for a TFDS image source (see the module docstring)."""
    tf = tfds_sources.tensorflow()
    tfds = tfds_sources._tfds()
    name, train_split, eval_split = info.tfds
    kw = {"data_dir": spec.data_dir, "name": spec.name}
    n_train = tfds_sources.num_examples(name, train_split, **kw)
    n_eval = tfds_sources.num_examples(name, eval_split, **kw)
    label_feature = tfds_sources.features(name, **kw)["label"]
    K = int(getattr(label_feature, "num_classes", info.num_classes))
    B, rows = spec.batch_size, local_rows(spec.batch_size, spec)
    steps = batching.steps_per_epoch(n_train, B, f"config.data.name={spec.name!r}")
    skip = {"image": tfds.decode.SkipDecoding()}
    auto = tf.data.AUTOTUNE
    ra, reps = randaugment.parse(spec.randaugment), spec.repeated_aug
    fill = randaugment.fill_colour(info.mean)

    def keep_rows(global_batch: int, sl: slice):
        return lambda i, ex: (i % global_batch >= sl.start) & (i % global_batch < sl.stop)

    def keep_strided(i, ex):
        return (i % B) % spec.process_count == spec.process_index

    def epoch_dataset(epoch: int, offset: int):
        seed = _seed_pair(spec.seed, epoch)
        ds = tfds_sources.load_split(name, train_split, shuffle_seed=seed, decoders=skip, **kw)
        ds = ds.shuffle(spec.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        if reps > 1:
            ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(reps))
        ds = ds.take(steps * B).enumerate().skip(offset)
        ds = ds.filter(keep_strided if reps > 1 else keep_rows(B, rows))

        @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python control flow
        def prep(i, ex):
            s = tf.stack([tf.constant(_seed_pair(spec.seed, epoch, 7), tf.int64), i])
            img = _train_image(tf, ex["image"], s, st, info, spec.random_erase, ra, fill)
            return {"image": img, "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.map(prep, num_parallel_calls=auto, deterministic=True)
        return ds.batch(spec.local_batch_size, drop_remainder=True).prefetch(2)

    def finish(batch: dict, step: int) -> Batch:
        batch = {"image": batch["image"].astype(np.float32), "label": batch["label"]}
        rng = batching.rng_for(spec.seed, batching.AUGMENT, step, spec.process_index)
        mix = augment.draw_mix(
            rng, st.size, st.size, spec.mixup_alpha, spec.cutmix_alpha, spec.mix_switch_prob
        )
        if mix is not None:
            batch["label_soft"] = augment.soft_labels(
                batch["label"], K, spec.label_smoothing, batch["label"][::-1], mix.lam
            )
            batch["image"] = augment.apply_mix(batch["image"], batch["image"][::-1], mix)
        elif spec.label_smoothing > 0:
            batch["label_soft"] = augment.soft_labels(batch["label"], K, spec.label_smoothing)
        return batch

    def train(start_step: int) -> Iterator[Batch]:
        first_epoch, pos = divmod(start_step, steps)
        step = start_step
        for epoch in itertools.count(first_epoch):
            ds = epoch_dataset(epoch, pos * B if epoch == first_epoch else 0)
            for batch in tfds_sources.as_numpy(ds):
                yield finish(batch, step)
                step += 1

    def eval_local(split: str, global_batch: int, count: int, shuffle_seed=None):
        ds = tfds_sources.load_split(name, split, shuffle_seed=shuffle_seed, decoders=skip, **kw)
        if shuffle_seed is not None:
            ds = ds.shuffle(spec.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(count).enumerate()
        ds = ds.filter(keep_rows(global_batch, local_rows(global_batch, spec)))
        ds = ds.map(
            lambda i, ex: {
                "image": _eval_image(tf, ex["image"], st, info),
                "label": tf.cast(ex["label"], tf.int32),
            },
            num_parallel_calls=auto,
            deterministic=True,
        )
        return tfds_sources.as_numpy(ds.batch(global_batch // spec.process_count).prefetch(2))

    def evaluate(limit: int | None) -> Iterator[Batch]:
        Be = spec.eval_batch_size
        sl, nb = local_rows(Be, spec), Be // spec.process_count
        it = iter(eval_local(eval_split, Be, n_eval))
        empty = {
            "image": np.zeros((0, st.size, st.size, st.channels), np.float32),
            "label": np.zeros((0,), np.int32),
        }
        for lo, hi in batching.eval_slices(n_eval, Be, limit):
            real = int(np.clip(hi - lo - sl.start, 0, nb))
            batch = next(it) if real else empty
            batch = batching.pad_rows(dict(batch), nb, {})
            batch["example_mask"] = (np.arange(nb) < real).astype(np.float32)
            yield batch

    def calib(num: int, size: int) -> list[Batch]:
        seed = _seed_pair(spec.seed, batching.CALIB)
        batches = eval_local(train_split, size, num * size, shuffle_seed=seed)
        return [dict(b) for b in itertools.islice(batches, num)]

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
