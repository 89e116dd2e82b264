"""Device mesh from the config, and how parameters and batches are sharded on it.

``config.mesh = {"data": -1, "fsdp": 1}``: a 2-D mesh with axes ``data`` and ``fsdp``; one
size may be -1 (all remaining devices). Batches are split over both axes along their leading
dimension. Each parameter (and its optimizer moments) is split over ``fsdp`` along its
largest dimension that divides evenly, else replicated. The same code runs on one CPU device,
one GPU host or many hosts (the processes join first: ``qtx.train.distributed.join``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qtx.errors import UserError

AXES = ("data", "fsdp")


def make_mesh(cfg: Mapping | None = None, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh; errors name ``config.mesh`` when sizes do not fit."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(AXES))
    if unknown:
        raise UserError(f"config.mesh has unknown field(s) {unknown}; allowed: {list(AXES)}.")
    devices = np.asarray(devices if devices is not None else jax.devices())
    n = devices.size
    sizes = [int(cfg.get("data", -1)), int(cfg.get("fsdp", 1))]
    given = dict(zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise UserError("config.mesh: at most one of data/fsdp may be -1 (all remaining).")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or n % fixed:
        raise UserError(
            f"config.mesh={given} does not fit {n} devices; allowed: positive "
            f"sizes (or one -1) whose product divides {n}."
        )
    sizes = [n // fixed if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise UserError(
            f"config.mesh={given} uses {int(np.prod(sizes))} of {n} devices; "
            "allowed: sizes whose product equals the device count."
        )
    return Mesh(devices.reshape(sizes), AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest evenly divisible dimension over ``fsdp``; scalars replicated."""
    if fsdp == 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp == 0 and shape[i] >= fsdp:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, abstract_tree):
    """NamedShardings for every leaf of an abstract (ShapeDtypeStruct) tree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: dict):
    """This process's rows -> global arrays sharded over (data, fsdp) on the leading axis."""
    sharding = batch_sharding(mesh)
    n = mesh.size
    for k, v in local_batch.items():
        rows = np.shape(v)[0] * jax.process_count()
        if rows % n:
            raise UserError(
                f"the global batch ({rows} rows of '{k}') is not divisible by the {n} devices of "
                "the mesh; set config.data.batch_size to a multiple of the device count."
            )
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def fetch(tree):
    """Device arrays -> NumPy on every process; global arrays sharded over several hosts are
    gathered first (``process_allgather``), so host code sees the whole batch."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
