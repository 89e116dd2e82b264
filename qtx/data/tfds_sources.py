"""The single gateway to TensorFlow Datasets.

Every TFDS read in ``qtx.data`` goes through :func:`load_split`, which opens the builder with
``tfds.builder(name, data_dir=config.data.data_dir or None, try_gcs=False)`` and never
downloads: when the dataset is not already prepared under the data dir it raises a
``ValueError`` naming ``config.data.name`` and ``config.data.data_dir``. Datasets this TFDS
version does not register (e.g. ``wikitext/wikitext-2-raw-v1``) are still read when a
prepared copy sits in ``<data_dir>/<name>/<version>/``.

TensorFlow is imported lazily, on the first TFDS access.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from absl import logging

from qtx.errors import UserError


@functools.cache
def tensorflow():
    """TensorFlow, imported with its start-up log lines kept off stderr: TF >= 2.20 writes
    them from C++ before its log level applies, so they would break the one-line errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
        import tensorflow_datasets  # noqa: F401  (it loads the rest of TF's native code)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


def _tfds():
    """Import TFDS, keeping TensorFlow quiet and off any GPU (JAX owns accelerators)."""
    tf = tensorflow()
    import tensorflow_datasets as tfds

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialized by other code
        pass
    return tfds


def _default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _not_prepared(tfds_name: str, data_dir: str | None, name: str) -> UserError:
    where = data_dir or f"{_default_data_dir()} (the TFDS default)"
    return UserError(
        f"the TFDS dataset {tfds_name!r} of config.data.name={name!r} is not prepared under "
        f"config.data.data_dir={where}; " + how_to_prepare(tfds_name)
    )


def how_to_prepare(tfds_name: str) -> str:
    """The once-only command, with network access, that prepares ``tfds_name``."""
    build = (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{tfds_name}', data_dir='DIR').download_and_prepare()\""
    )
    if tfds_name.startswith("wikitext/"):
        return (
            "this TFDS version does not register it, so prepare it once with one that does "
            f"(tfds build {tfds_name} --data_dir=DIR), copy DIR here and set "
            "--config.data.data_dir=DIR."
        )
    manual = (
        " (ImageNet needs its tarballs in DIR/downloads/manual first)"
        if tfds_name == "imagenet2012"
        else ""
    )
    return (
        f"with network access, prepare it once: {build}{manual}, copy DIR here if needed and "
        "set --config.data.data_dir=DIR."
    )


def missing(tfds_name: str, *, data_dir: str | None, name: str) -> str | None:
    """Why ``tfds_name`` cannot be read here (one sentence), or None when it is prepared."""
    try:
        get_builder(tfds_name, data_dir=data_dir, name=name)
    except UserError as e:
        return str(e)
    return None


def is_prepared(builder) -> bool:
    """Whether the builder's files exist (split out so tests can substitute mock data)."""
    return builder.is_prepared()


def _from_directory(tfds, tfds_name: str, data_dir: str | None):
    """Builder for a prepared but unregistered dataset: the newest version folder."""
    root = Path(data_dir or _default_data_dir()) / tfds_name
    if not root.is_dir():
        return None
    versions = [p for p in root.iterdir() if (p / "dataset_info.json").is_file()]
    if not versions:
        return None
    newest = max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    return tfds.builder_from_directory(str(newest))


@functools.lru_cache(maxsize=32)
def get_builder(tfds_name: str, *, data_dir: str | None, name: str):
    """Prepared ``DatasetBuilder`` for ``tfds_name``; raises ValueError when unavailable."""
    tfds = _tfds()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # TFDS warns about the very folders we look for
    try:
        try:
            builder = tfds.builder(tfds_name, data_dir=data_dir or None, try_gcs=False)
        except tfds.core.registered.DatasetNotFoundError:
            builder = _from_directory(tfds, tfds_name, data_dir)
            if builder is None:
                raise _not_prepared(tfds_name, data_dir, name) from None
        prepared = is_prepared(builder)
    finally:
        logging.set_verbosity(verbosity)
    if not prepared:
        raise _not_prepared(tfds_name, data_dir, name)
    return builder


def load_split(
    tfds_name: str,
    split: str,
    *,
    data_dir: str | None,
    name: str,
    shuffle_seed: int | None = None,
    decoders=None,
):
    """``tf.data.Dataset`` of one split: file order shuffled with ``shuffle_seed`` when given,
    else the stored order. Reading is deterministic either way."""
    tf = tensorflow()
    tfds = _tfds()
    builder = get_builder(tfds_name, data_dir=data_dir, name=name)
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(
        options=options,
        shuffle_seed=shuffle_seed,
        try_autocache=False,
        interleave_cycle_length=16 if shuffle_seed is not None else 1,
    )
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        decoders=decoders,
        read_config=read_config,
    )


def num_examples(tfds_name: str, split: str, *, data_dir: str | None, name: str) -> int:
    """Number of examples of ``split`` (slicing syntax such as ``train[:99%]`` allowed)."""
    builder = get_builder(tfds_name, data_dir=data_dir, name=name)
    return int(builder.info.splits[split].num_examples)


def features(tfds_name: str, *, data_dir: str | None, name: str):
    """The builder's ``FeaturesDict`` (shapes, label count)."""
    return get_builder(tfds_name, data_dir=data_dir, name=name).info.features


def as_numpy(ds):
    """Iterate a ``tf.data.Dataset`` as NumPy structures."""
    return _tfds().as_numpy(ds)
