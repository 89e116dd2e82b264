"""Checkpoints in ``<workdir>/checkpoints`` with orbax's CheckpointManager, verified on restore.

Each step directory holds ``params``, ``train`` (step, optimizer state and the other variable
collections) and ``meta`` (JSON: the experiment config and the model config), so evaluation
restores the parameters alone. Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save keeps its previous checkpoint; ``keep`` bounds how many
are kept. Before restoring, the stored parameter tree is compared with the model's and any
difference is named in one sentence.

Damage. Orbax does not checksum array data: a flipped byte restores silently as a wrong
number, a truncated chunk fails deep inside TensorStore. So once a save has completed, the
primary process writes ``<step>/SHA256SUMS`` (the ``sha256sum`` format: every file of the step
with its SHA-256; check by hand with ``cd <step> && sha256sum -c SHA256SUMS``). Restoring
walks the steps from the newest: a step is damaged when a listed file is missing or hashes
differently (truncated, overwritten, flipped bits), or when orbax cannot read it (this also
covers a step whose manifest was never written because the run was killed right after the
save). Damaged steps newer than
the newest intact one are named in one line each and moved to
``<workdir>/checkpoints_damaged/`` (never deleted); if no step is intact, nothing is moved
and one error names every step and what is wrong with it. On several hosts every process
computes the same verdicts from the shared workdir and only process 0 moves directories.

Nothing is created on disk until the first save, so a run that fails before it (bad config,
missing data, no checkpoint to evaluate) leaves the workdir as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax.traverse_util import flatten_dict

from qtx.errors import UserError
from qtx.train.steps import TrainState

MANIFEST = "SHA256SUMS"
DAMAGED_DIR = "checkpoints_damaged"
DIVERGED_DIR = "checkpoints_diverged"
_CHUNK = 1 << 24
T = TypeVar("T")


class DamagedCheckpoint(Exception):
    """A checkpoint step that cannot be read completely (``reason``: one phrase)."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} is damaged: {reason}")


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_newest` read: the ``step``, the restored ``tree`` (a
    TrainState or parameters), the non-parameter collections ``extra`` and the
    ``shardings`` the arrays were placed with (None: those of the abstract tree)."""

    step: int
    tree: Any
    extra: dict
    shardings: Any


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "extra": state.extra}


def _shapes(tree) -> dict[str, tuple]:
    return {
        "/".join(map(str, k)): tuple(getattr(v, "shape", ()))
        for k, v in flatten_dict(tree, keep_empty_nodes=False).items()
    }


def compare_trees(stored: dict, expected: dict, where: str) -> None:
    """Raises UserError naming missing / unexpected keys and shape mismatches."""
    s, e = _shapes(stored), _shapes(expected)
    missing = sorted(set(e) - set(s))
    extra = sorted(set(s) - set(e))
    shapes = sorted(f"{k} {s[k]} vs {e[k]}" for k in set(s) & set(e) if s[k] != e[k])
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches (stored vs model) {shapes[:8]}")
        raise UserError(
            f"checkpoint {where} does not match the configured model ("
            + "; ".join(parts)
            + "); use the config it was trained with, or a fresh --workdir."
        )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Writes ``<step_dir>/SHA256SUMS`` (atomically: a temporary file, then a rename)."""
    lines = [f"{_sha256(os.path.join(step_dir, rel))}  {rel}\n" for rel in _files(step_dir)]
    tmp = os.path.join(step_dir, f"{MANIFEST}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
    """What is wrong with the files of ``step_dir`` per its manifest (None: intact, or no
    manifest): a listed file that is missing, or whose bytes hash differently (a truncated
    or overwritten chunk, flipped bits)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    entries = []
    with open(path) as f:
        for line in f:
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                return f"its {MANIFEST} is unreadable"
            entries.append((digest, rel))
    for _, rel in entries:
        if not os.path.isfile(os.path.join(step_dir, rel)):
            return f"{rel} is missing"
    for digest, rel in entries:
        if _sha256(os.path.join(step_dir, rel)) != digest:
            return f"{rel} has other bytes than were written (SHA-256 mismatch)"
    return None


def newest_complete_step(directory: str) -> int | None:
    """The newest step whose save completed under ``directory`` (orbax renames a step's
    temporary directory when it is complete), or None. Cheap, for messages: restoring still
    verifies it."""
    try:
        steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()).split(" See full TensorStore details")[0]
    return f"{type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


class Checkpointer:
    """Save / restore :class:`TrainState` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.keep, self.async_save = keep, async_save
        self._manager: ocp.CheckpointManager | None = None
        self._pending: list[int] = []  # saved steps still without a manifest
        self._hasher: threading.Thread | None = None

    # -- the orbax manager, opened lazily (reading never creates the directory) --
    def _open(self, write: bool) -> ocp.CheckpointManager | None:
        if self._manager is None:
            if not write and not os.path.isdir(self.directory):
                return None
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=write, enable_async_checkpointing=self.async_save
            )
            handlers = {
                "params": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            }
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        return self._manager

    @property
    def manager(self) -> ocp.CheckpointManager:
        return self._open(write=True)

    def _reopen(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def steps(self) -> list[int]:
        m = self._open(write=False)
        return sorted(m.all_steps()) if m is not None else []

    def latest_step(self) -> int | None:
        """The newest step on disk (not verified; see :meth:`restore_newest_intact`)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -- saving --
    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        step = int(jax.device_get(state.step))
        self._write_manifests()  # of the previous save, once orbax has committed it
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(_train_item(state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._pending.append(step)

    def _write_manifests(self, block: bool = False) -> None:
        """After orbax has finished the pending saves, hashes them on process 0 in a
        background thread (``block``: wait for it)."""
        if self._manager is None:
            return
        if self._pending:
            self._manager.wait_until_finished()
            if self._hasher is not None:
                self._hasher.join()
            steps, self._pending = self._pending, []
            if jax.process_index() == 0:
                self._hasher = threading.Thread(
                    target=self._hash_steps, args=(steps,), name="qtx-manifest", daemon=True
                )
                self._hasher.start()
        if block and self._hasher is not None:
            self._hasher.join()
            self._hasher = None

    def _hash_steps(self, steps: list[int]) -> None:
        for step in steps:
            d = self.step_dir(step)
            try:
                if os.path.isdir(d):
                    write_manifest(d)
            except OSError as e:  # removed by max_to_keep meanwhile, or a full disk
                logging.warning("no %s for checkpoint step %d: %s", MANIFEST, step, e)

    # -- verification and restoring --
    def _read(self, step: int, fn: Callable[[], T]) -> T:
        """Runs an orbax read; any failure of the read itself means a damaged step."""
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - TensorStore/orbax raise many kinds
            raise DamagedCheckpoint(step, f"it cannot be read ({_short(e)})") from e

    def verify(self, step: int) -> str | None:
        """What is wrong with ``step`` per its manifest, or None."""
        return verify_manifest(self.step_dir(step))

    def restore_newest_intact(
        self, load: Callable[[int], T], *, move_aside: bool = True
    ) -> tuple[int, T] | None:
        """``(step, load(step))`` for the newest step that verifies and loads, or None when
        there is no checkpoint. Newer damaged steps are reported in one line each and moved
        to ``<workdir>/checkpoints_damaged`` (unless ``move_aside`` is False). Raises
        UserError when every step is damaged, moving nothing."""
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                try:
                    result = load(step)
                except DamagedCheckpoint as e:
                    problem = e.reason
                else:
                    self._set_aside(damaged, move_aside, fallback=step)
                    return step, result
            damaged.append((step, problem))
        if not damaged:
            return None
        raise UserError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in damaged)
            + "; nothing was moved. Restore a backup of the workdir, move the damaged steps "
            "away to start over, or use a fresh --workdir."
        )

    def restore_newest(
        self,
        abstract: Any,
        shardings: Callable[[Any], Any] | None = None,
        *,
        extra: bool = False,
        move_aside: bool = True,
        step: int | None = None,
    ) -> Restored | None:
        """The newest intact checkpoint (:meth:`restore_newest_intact`) restored into
        ``abstract``, or None when there is no checkpoint.

        ``abstract``: a :class:`TrainState` (the whole state is restored) or a parameter tree
        (the parameters alone) of ShapeDtypeStructs, or a function ``step -> such a tree``
        for a tree read from the step itself. ``shardings``: a function ``abstract ->
        shardings`` (a tree like ``abstract``, or one Sharding for every leaf) that places
        the restored arrays; None keeps the shardings of ``abstract``. ``extra``: also the
        saved non-parameter collections (frozen ``quant_stats``, ...), taken as stored; of a
        TrainState they become its ``extra``. ``step``: that step instead of the newest
        (verified first; damage is an error)."""

        def load(s: int) -> Restored:
            tree = abstract(s) if callable(abstract) else abstract
            if isinstance(tree, TrainState) and extra:
                stored = self.restore_extra(s)
                tree = tree.replace(extra=jax.eval_shape(lambda: stored))
            placed = shardings(tree) if shardings is not None else None
            if placed is not None:
                if isinstance(placed, jax.sharding.Sharding):
                    placed = jax.tree.map(lambda _: placed, tree)
                tree = jax.tree.map(
                    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                    tree,
                    placed,
                )
            if isinstance(tree, TrainState):
                state = self.restore(tree, s)
                return Restored(s, state, state.extra, placed)
            params = self.restore_params(tree, s)
            return Restored(s, params, self.restore_extra(s) if extra else {}, placed)

        if step is None:
            restored = self.restore_newest_intact(load, move_aside=move_aside)
            return None if restored is None else restored[1]
        problem = self.verify(step)
        if problem:
            raise UserError(f"checkpoint step {step} is damaged ({problem}).")
        return load(step)

    def _move(self, step: int, folder: str) -> str:
        """Moves step ``step`` to ``<workdir>/<folder>/<step>`` (process 0); returns where."""
        target = os.path.join(self.workdir, folder, str(step))
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.workdir, folder, f"{step}.{n}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.step_dir(step), target)
        return target

    def _moved(self) -> None:
        self._reopen()  # orbax caches the step list
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("qtx_checkpoints_moved_aside")

    def _set_aside(self, damaged: list[tuple[int, str]], move: bool, fallback: int) -> None:
        for step, why in damaged:
            where = f"moved to {self._move(step, DAMAGED_DIR)}" if move else "left in place"
            if jax.process_index() == 0:
                print(
                    f"checkpoint step {step} is damaged ({why}); {where}; using step {fallback}.",
                    flush=True,
                )
        if damaged and move:
            self._moved()

    def set_aside_diverged(self, step: int) -> str:
        """Moves a saved step whose state turned out to diverge to
        ``<workdir>/checkpoints_diverged/<step>`` (after its save has completed)."""
        self.wait()
        if step not in self.steps():
            return ""
        where = self._move(step, DIVERGED_DIR)
        self._moved()
        return where

    def meta(self, step: int) -> dict:
        m = self._open(write=False)
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._read(step, lambda: m.restore(step, args=args).meta)

    def _stored(self, item: str, step: int):
        def read():
            md = self._open(write=False).item_metadata(step)[item]
            if md is None:
                raise FileNotFoundError(f"no metadata of item {item!r}")
            return md.tree if hasattr(md, "tree") else md

        return self._read(step, read)

    def check(self, abstract: TrainState, step: int) -> None:
        where = f"{self.directory}/{step}"
        compare_trees(self._stored("params", step), abstract.params, where)
        compare_trees(self._stored("train", step).get("extra", {}), abstract.extra, where)

    def restore(self, abstract: TrainState, step: int) -> TrainState:
        """Restores into the shardings of ``abstract`` (a TrainState of ShapeDtypeStructs)."""
        self.check(abstract, step)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(_train_item(abstract)),
        )
        r = self._read(step, lambda: self._open(write=False).restore(step, args=args))
        t = r.train
        return TrainState(t["step"], r.params, t["opt_state"], t.get("extra", {}))

    def restore_params(self, abstract_params, step: int):
        """Only the parameters (for evaluation or ``init_from``)."""
        compare_trees(self._stored("params", step), abstract_params, f"{self.directory}/{step}")
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self._read(step, lambda: self._open(write=False).restore(step, args=args)).params

    def restore_extra(self, step: int) -> dict:
        """The saved non-parameter collections (e.g. frozen ``quant_stats``) as arrays."""
        stored = self._stored("train", step)
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
        args = ocp.args.Composite(train=ocp.args.StandardRestore(abstract))
        r = self._read(step, lambda: self._open(write=False).restore(step, args=args))
        return r.train.get("extra", {})

    def stored_params_shapes(self, step: int) -> dict[str, tuple]:
        return _shapes(self._stored("params", step))

    def wait(self) -> None:
        """Blocks until every save is on disk with its manifest."""
        self._write_manifests(block=True)

    def close(self) -> None:
        self.wait()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
