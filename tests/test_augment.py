"""Tests of RandAugment (NumPy and tf paths) and repeated augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from qtx.data import make_pipeline, randaugment, tfds_sources
from qtx.data.batching import shard_rows, train_indices
from qtx.data.config import DEFAULTS
from qtx.data.randaugment import RandAugmentSpec, kernel, op_param

DEIT = "rand-m9-mstd0.5-inc1"
FILL = np.asarray([124.0, 116.0, 104.0], np.float32)
IMAGE_CFG = {
    "name": "digits",
    "batch_size": 24,
    "image_size": 12,
    "channels": 3,
    "crop_scale": (0.5, 1.0),
    "hflip": True,
}


def images(n=3, H=9, W=11, C=3, seed=0) -> np.ndarray:
    """Random uint8-valued float32 images, the second squeezed into [40, 200]."""
    x = np.random.default_rng(seed).integers(0, 256, (n, H, W, C)).astype(np.float32)
    x[1:2] = np.clip(x[1:2], 40, 200)
    return x


def first(pipe, step=0):
    return next(pipe.train_iterator(step))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- spec and config


def test_parse_spec():
    assert randaugment.parse("") is None and randaugment.parse(None) is None
    assert randaugment.parse(DEIT) == RandAugmentSpec(2, 9.0, 0.5, 10.0, True, 0.5)
    assert randaugment.parse("rand") == RandAugmentSpec()  # timm defaults: n=2, m=10
    spec = randaugment.parse("rand-n3-m10.5-mmax12-p0.7")
    assert (spec.num_ops, spec.magnitude, spec.magnitude_max, spec.prob) == (3, 10.5, 12.0, 0.7)
    assert spec.ops == randaugment.OPS and len(spec.ops) == 15
    assert randaugment.parse(DEIT).ops == randaugment.INCREASING_OPS
    assert "PosterizeIncreasing" in randaugment.INCREASING_OPS


@pytest.mark.parametrize(
    "value", ["rand-m9-x1", "auto-m9", "rand-n0", "rand-inc2", "rand-m9-m8", "rand-p2", 5]
)
def test_bad_randaugment_names_the_field(value):
    with pytest.raises(ValueError, match=r"config\.data\.randaugment.*rand-m9-mstd0\.5"):
        make_pipeline({**IMAGE_CFG, "randaugment": value}, task="image")


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_repeated_aug_names_the_field(value):
    with pytest.raises(ValueError, match=r"config\.data\.repeated_aug"):
        make_pipeline({**IMAGE_CFG, "repeated_aug": value}, task="image")


def test_defaults_are_off():
    assert DEFAULTS["randaugment"] == "" and DEFAULTS["repeated_aug"] == 1
    pipe = make_pipeline(IMAGE_CFG, task="image")
    assert pipe.spec.randaugment == "" and pipe.spec.repeated_aug == 1


# ---------------------------------------------------------------- magnitudes


def test_magnitude_mapping_at_m9_matches_timm_formulas():
    m, pos, neg = np.asarray([9.0]), np.asarray([1.0]), np.asarray([-1.0])
    level = 9 / 10
    expect = {
        "Rotate": level * 30.0,
        "ShearX": level * 0.3,
        "TranslateXRel": level * 0.45,
        "PosterizeIncreasing": 4 - int(level * 4),  # 1 bit kept
        "Posterize": int(level * 4),
        "SolarizeIncreasing": 256 - int(level * 256),  # 26
        "Solarize": int(level * 256),
        "SolarizeAdd": int(level * 110),  # 99
        "ColorIncreasing": 1.0 + level * 0.9,
        "Color": level * 1.8 + 0.1,
    }
    for name, value in expect.items():
        assert op_param(name, m, pos, np)[0] == pytest.approx(value), name
    for name in ("Rotate", "ShearY", "TranslateYRel"):
        assert op_param(name, m, neg, np)[0] == -op_param(name, m, pos, np)[0]
    assert op_param("SharpnessIncreasing", m, neg, np)[0] == pytest.approx(1.0 - level * 0.9)
    assert op_param("BrightnessIncreasing", np.asarray([10.0]), neg, np)[0] == pytest.approx(0.1)


def test_draw_statistics():
    spec = randaugment.parse(DEIT)
    d = randaugment.draw(np.random.default_rng(0), 20_000, spec)
    assert d.ops.shape == (20_000, 2) and d.ops.min() == 0 and d.ops.max() == 14
    assert np.abs(np.bincount(d.ops.ravel()) / d.ops.size - 1 / 15).max() < 0.01
    assert abs(d.apply.mean() - 0.5) < 0.01 and abs((d.sign > 0).mean() - 0.5) < 0.01
    assert d.magnitude.min() >= 0 and d.magnitude.max() == 10.0  # clipped at mmax
    assert abs(d.magnitude.mean() - 9.0) < 0.02 and abs(d.magnitude.std() - 0.47) < 0.03
    uniform = randaugment.draw(np.random.default_rng(0), 20_000, randaugment.parse("rand-mstd101"))
    assert abs(uniform.magnitude.mean() - 5.0) < 0.1


# ---------------------------------------------------------------- ops against PIL


def pil_apply(x: np.ndarray, fn) -> np.ndarray:
    from PIL import Image

    mode = "L" if x.shape[-1] == 1 else "RGB"
    out = []
    for img in x.astype(np.uint8):
        res = np.asarray(fn(Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode)))
        out.append(res.reshape(img.shape))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("channels", [3, 1])
def test_pointwise_and_enhance_ops_match_pil(channels):
    pytest.importorskip("PIL")
    from PIL import ImageEnhance, ImageOps

    x = images(C=channels)
    n = len(x)
    x[2] = x[2] // 64 * 64  # few levels, for equalize
    cases = [
        ("Invert", 0, ImageOps.invert),
        ("AutoContrast", 0, ImageOps.autocontrast),
        ("Equalize", 0, ImageOps.equalize),
    ]
    for bits in range(1, 8):
        cases.append(("Posterize", bits, lambda im, b=bits: ImageOps.posterize(im, b)))
    for t in (0, 26, 128, 230, 256):
        cases.append(("Solarize", t, lambda im, t=t: ImageOps.solarize(im, t)))
    for add in (0, 37, 99, 110):
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        cases.append(("SolarizeAdd", add, lambda im, lut=lut: im.point(lut * channels)))
    for name, cls in [
        ("Color", ImageEnhance.Color),
        ("Contrast", ImageEnhance.Contrast),
        ("Brightness", ImageEnhance.Brightness),
        ("Sharpness", ImageEnhance.Sharpness),
    ]:
        for f in (0.1, 0.37, 1.0, 1.81, 1.9):
            cases.append((name, f, lambda im, c=cls, f=f: c(im).enhance(f)))
    for name, p, fn in cases:
        out = kernel(name)(x, np.full(n, p, np.float64), FILL[:channels])
        assert out.shape == x.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out, pil_apply(x, fn), err_msg=f"{name}({p})")
    black = kernel("PosterizeIncreasing")(x, np.zeros(n), FILL)  # 0 bits kept
    assert (black == 0).all()


def test_geometric_ops_match_pil_and_fill():
    pytest.importorskip("PIL")
    from PIL import Image

    x, fill = images(), (124, 116, 104)
    n, H, W, _ = x.shape
    kw = {"resample": Image.BILINEAR, "fillcolor": fill}

    def affine(*coef):
        return lambda im: im.transform(im.size, Image.AFFINE, coef, **kw)

    cases = [
        ("Rotate", 27.0, lambda im: im.rotate(27.0, **kw)),
        ("Rotate", -13.5, lambda im: im.rotate(-13.5, **kw)),
        ("ShearX", 0.27, affine(1, 0.27, 0, 0, 1, 0)),
        ("ShearY", -0.3, affine(1, 0, 0, -0.3, 1, 0)),
        ("TranslateXRel", 0.2, affine(1, 0, 0.2 * W, 0, 1, 0)),
        ("TranslateYRel", -0.45, affine(1, 0, 0, 0, 1, -0.45 * H)),
    ]
    for name, p, fn in cases:
        out = kernel(name)(x, np.full(n, p), FILL)
        assert out.shape == x.shape
        np.testing.assert_array_equal(out, pil_apply(x, fn), err_msg=f"{name}({p})")
    for name in randaugment.GEOMETRIC:  # zero magnitude: identity
        np.testing.assert_array_equal(kernel(name)(x, np.zeros(n), FILL), x, err_msg=name)
    shifted = kernel("TranslateXRel")(x, np.full(n, 3 / W), FILL)  # 3 whole pixels left
    np.testing.assert_array_equal(shifted[:, :, : W - 3], x[:, :, 3:])
    assert (shifted[:, :, W - 3 :] == FILL).all()
    down = kernel("TranslateYRel")(x, np.full(n, -0.45), FILL)
    assert (down[:, : int(0.45 * H)] == FILL).all()


def test_numpy_and_tf_kernels_agree():
    tf = pytest.importorskip("tensorflow")
    from qtx.data import randaugment_tf

    x = images(n=2, H=8, W=7)
    mags, signs = np.asarray([9.0, 4.3]), np.asarray([1.0, -1.0])
    for name in dict.fromkeys(randaugment.INCREASING_OPS + randaugment.OPS):
        p = op_param(name, mags, signs, np) + np.zeros(2)
        ref = kernel(name)(x, p, FILL)
        for i in range(2):
            out = randaugment_tf.kernel(tf, name, tf.constant(x[i]), tf.constant(p[i]), FILL)
            np.testing.assert_array_equal(out.numpy(), ref[i], err_msg=name)


# ---------------------------------------------------------------- RandAugment determinism


def test_randaugment_numpy_is_deterministic_and_changes_batches():
    cfg = {**IMAGE_CFG, "randaugment": DEIT}
    pipe = make_pipeline(cfg, task="image")
    it = pipe.train_iterator()
    fresh = [next(it) for _ in range(3)]
    assert_same(first(make_pipeline(cfg, task="image"), 2), fresh[2])
    off = first(make_pipeline(IMAGE_CFG, task="image"), 2)
    np.testing.assert_array_equal(off["label"], fresh[2]["label"])
    changed = np.abs(off["image"] - fresh[2]["image"]).reshape(24, -1).max(axis=1) > 0.05
    assert 10 < changed.sum() < 24  # about 3/4 of the images get at least one op
    shards = [make_pipeline(cfg, task="image", process_index=k, process_count=2) for k in (0, 1)]
    parts = [first(s, 2) for s in shards]
    assert_same({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, fresh[2])


def test_randaugment_tf_is_deterministic_in_seed():
    tf = pytest.importorskip("tensorflow")
    from qtx.data import randaugment_tf

    spec = randaugment.parse("rand-m9-mstd0.5-inc1-n3")
    fn = tf.function(
        lambda img, seed: randaugment_tf.apply(tf, img, seed, spec, FILL), autograph=False
    )
    x = images(n=1, H=10, W=10)[0]
    run = lambda a, b: fn(tf.constant(x), tf.constant([a, b], tf.int64)).numpy()
    outs = [run(5, i) for i in range(12)]
    np.testing.assert_array_equal(run(5, 3), outs[3])
    assert outs[0].shape == x.shape and outs[0].dtype == np.float32
    assert len({o.tobytes() for o in outs}) >= 10
    for o in outs:
        assert o.min() >= 0 and o.max() <= 255 and (o == np.round(o)).all()


# ---------------------------------------------------------------- repeated augmentation


def test_repeated_index_stream():
    n, B, r = 100, 12, 3
    epoch = np.concatenate([train_indices(n, B, 7, s, r) for s in range(8)])
    ids, counts = np.unique(epoch, return_counts=True)
    assert len(epoch) == 96 and len(ids) == 32 and (counts == r).all()
    assert (epoch.reshape(-1, r) == epoch[::r, None]).all()  # copies are consecutive
    np.testing.assert_array_equal(epoch[::r], train_indices(n, 32, 7, 0))  # the permutation
    np.testing.assert_array_equal(train_indices(n, B, 7, 5, r), epoch[60:72])
    nxt = np.concatenate([train_indices(n, B, 7, s, r) for s in range(8, 16)])
    assert not np.array_equal(nxt, epoch)
    np.testing.assert_array_equal(train_indices(n, B, 7, 3, 1), train_indices(n, B, 7, 3))
    strided = [shard_rows(B, k, 2, True) for k in (0, 1)]
    np.testing.assert_array_equal(np.sort(np.concatenate(strided)), np.arange(B))
    chunk = epoch[:B]  # 4 images x 3 copies: every image has copies on both processes
    assert set(chunk[strided[0]]) == set(chunk[strided[1]]) == set(chunk)


def test_repeated_aug_pipeline_copies_shards_and_resume():
    cfg = {**IMAGE_CFG, "repeated_aug": 3, "randaugment": DEIT, "random_erase": 0.25}
    cfg |= {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    pipe = make_pipeline(cfg, task="image")
    assert pipe.steps_per_epoch == make_pipeline(IMAGE_CFG, task="image").steps_per_epoch
    it = pipe.train_iterator()
    fresh = [next(it) for _ in range(3)]
    assert_same(first(make_pipeline(cfg, task="image"), 2), fresh[2])
    plain = first(make_pipeline({**cfg, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}, task="image"))
    labels = plain["label"].reshape(8, 3)
    assert (labels == labels[:, :1]).all()
    copies = plain["image"].reshape(8, 3, -1)
    assert (np.abs(copies[:, 0] - copies[:, 1]).max(axis=1) > 0).all()
    assert (np.abs(copies[:, 1] - copies[:, 2]).max(axis=1) > 0).all()
    whole = fresh[2]
    shards = [make_pipeline(cfg, task="image", process_index=k, process_count=2) for k in (0, 1)]
    for k, s in enumerate(shards):
        part = first(s, 2)
        assert part["image"].shape[0] == 12
        for key in part:
            np.testing.assert_array_equal(part[key], whole[key][k::2], err_msg=key)


# ---------------------------------------------------------------- tf.data path


def test_tfds_randaugment_and_repeats_with_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_sources, "is_prepared", lambda builder: True)
    monkeypatch.setattr(tfds_sources, "num_examples", lambda *a, **k: 24)
    cfg = {
        "name": "mnist",
        "batch_size": 6,
        "data_dir": str(tmp_path),
        "shuffle_buffer": 8,
        "image_size": 12,
        "crop_scale": (0.5, 1.0),
        "randaugment": DEIT,
        "repeated_aug": 3,
    }
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        pipe = make_pipeline(cfg, task="image")
        it = pipe.train_iterator()
        b0, b1 = next(it), next(it)
        assert b0["image"].shape == (6, 12, 12, 1)
        assert_same(first(pipe, 1), b1)  # resume rebuilds the epoch and skips records
        labels = b1["label"].reshape(2, 3)
        assert (labels == labels[:, :1]).all()
        copies = b1["image"].reshape(2, 3, -1)
        assert (np.abs(copies[:, :1] - copies[:, 1:]).max(axis=2) > 0).all()
        off = first(make_pipeline({**cfg, "randaugment": ""}, task="image"), 1)
        np.testing.assert_array_equal(off["label"], b1["label"])
        assert not np.array_equal(off["image"], b1["image"])
        for k in (0, 1):
            part = first(make_pipeline(cfg, task="image", process_index=k, process_count=2), 1)
            assert_same(part, {key: v[k::2] for key, v in b1.items()})
