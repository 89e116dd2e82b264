"""Checkpointer.restore_newest on a hand-made state (no training): a TrainState or the
parameters alone, the abstract tree built from the step, placement, a chosen step, stored
extra collections, and the errors for damaged steps."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.errors import UserError
from qtx.train.checkpoint import DAMAGED_DIR, Checkpointer
from qtx.train.steps import TrainState


def state(step: int, extra=None) -> TrainState:
    params = {"dense": {"kernel": jnp.full((2, 3), float(step)), "bias": jnp.zeros(3)}}
    opt = {"mu": jnp.ones((2, 3))}
    return TrainState(jnp.asarray(step, jnp.int32), params, opt, extra or {})


def abstract(tree):
    return jax.eval_shape(lambda: tree)


@pytest.fixture
def workdir(tmp_path):
    """Steps 1 and 2 saved, with a ``quant_stats`` collection."""
    ck = Checkpointer(str(tmp_path), async_save=False)
    for s in (1, 2):
        ck.save(state(s, {"quant_stats": {"lo": jnp.full((3,), -s, jnp.float32)}}), {"s": s})
    ck.close()
    return str(tmp_path)


def test_no_checkpoint_is_none(tmp_path):
    ck = Checkpointer(str(tmp_path), async_save=False)
    assert ck.restore_newest(abstract(state(0).params)) is None
    assert not (tmp_path / "checkpoints").exists()


def test_train_state_with_stored_extra_and_shardings(workdir):
    ck = Checkpointer(workdir, async_save=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    r = ck.restore_newest(abstract(state(0)), lambda _: device, extra=True)
    ck.close()
    assert r.step == 2 and int(r.tree.step) == 2
    np.testing.assert_array_equal(r.tree.params["dense"]["kernel"], np.full((2, 3), 2.0))
    np.testing.assert_array_equal(r.extra["quant_stats"]["lo"], np.full((3,), -2.0))
    assert r.extra is r.tree.extra
    assert all(s == device for s in jax.tree.leaves(r.shardings))


def test_params_alone_from_a_builder_at_a_chosen_step(workdir):
    ck = Checkpointer(workdir, async_save=False)
    seen = []

    def build(step):
        seen.append(step)
        return abstract(state(0).params)

    r = ck.restore_newest(build, step=1)
    assert seen == [1] and r.step == 1 and r.extra == {} and r.shardings is None
    np.testing.assert_array_equal(r.tree["dense"]["kernel"], np.full((2, 3), 1.0))
    r = ck.restore_newest(abstract(state(0).params), extra=True)
    assert r.step == 2 and set(r.extra) == {"quant_stats"}
    ck.close()


def test_damaged_newest_falls_back_and_a_damaged_chosen_step_is_an_error(workdir):
    ck = Checkpointer(workdir, async_save=False)
    manifest = ck.step_dir(2) + "/SHA256SUMS"
    listed = open(manifest).read().splitlines()[0].split("  ", 1)[1]
    with open(f"{ck.step_dir(2)}/{listed}", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=r"checkpoint step 2 is damaged \(.*SHA-256 mismatch\)"):
        ck.restore_newest(abstract(state(0).params), step=2)
    r = ck.restore_newest(abstract(state(0).params), move_aside=False)
    assert r.step == 1 and os.path.isdir(ck.step_dir(2))  # left in place
    r = ck.restore_newest(abstract(state(0).params))
    assert r.step == 1 and not os.path.exists(ck.step_dir(2))
    assert os.path.isdir(os.path.join(workdir, DAMAGED_DIR, "2"))  # moved aside
    ck.close()
