"""Checkpoints in ``<workdir>/checkpoints`` with orbax's CheckpointManager.

Each step directory holds ``params``, ``train`` (step, optimizer state and the other variable
collections) and ``meta`` (JSON: the experiment config and the model config), so evaluation
restores the parameters alone. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save keeps its previous
checkpoint; ``keep`` bounds how many are kept. Before restoring, the stored parameter tree is
compared with the model's and any difference is named in one sentence.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from qtx.train.steps import TrainState


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "extra": state.extra}


def _shapes(tree) -> dict[str, tuple]:
    return {
        "/".join(map(str, k)): tuple(getattr(v, "shape", ()))
        for k, v in flatten_dict(tree, keep_empty_nodes=False).items()
    }


def compare_trees(stored: dict, expected: dict, where: str) -> None:
    """Raises ValueError naming missing / unexpected keys and shape mismatches."""
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
        raise ValueError(
            f"checkpoint {where} does not match the configured model ("
            + "; ".join(parts)
            + "); use the config it was trained with, or a fresh --workdir."
        )


class Checkpointer:
    """Save / restore :class:`TrainState` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(_train_item(state)),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def _stored(self, item: str, step: int):
        md = self.manager.item_metadata(step)[item]
        return md.tree if hasattr(md, "tree") else md

    def check(self, abstract: TrainState, step: int) -> None:
        where = f"{self.directory}/{step}"
        compare_trees(self._stored("params", step), abstract.params, where)
        compare_trees(self._stored("train", step).get("extra", {}), abstract.extra, where)

    def restore(self, abstract: TrainState, step: int | None = None) -> TrainState:
        """Restores into the shardings of ``abstract`` (a TrainState of ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        self.check(abstract, step)
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train=ocp.args.StandardRestore(_train_item(abstract)),
            ),
        )
        t = r.train
        return TrainState(t["step"], r.params, t["opt_state"], t.get("extra", {}))

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the parameters (for evaluation or ``init_from``)."""
        step = self.latest_step() if step is None else step
        compare_trees(self._stored("params", step), abstract_params, f"{self.directory}/{step}")
        r = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
        return r.params

    def restore_extra(self, step: int | None = None) -> dict:
        """The saved non-parameter collections (e.g. frozen ``quant_stats``) as arrays."""
        step = self.latest_step() if step is None else step
        stored = self._stored("train", step)
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
        r = self.manager.restore(
            step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract))
        )
        return r.train.get("extra", {})

    def stored_params_shapes(self, step: int | None = None) -> dict[str, tuple]:
        step = self.latest_step() if step is None else step
        return _shapes(self._stored("params", step))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
