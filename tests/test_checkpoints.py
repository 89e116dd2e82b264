"""Runs that survive damage: truncated and byte-flipped checkpoints are detected, moved aside
and the newest intact one is used; SIGTERM / SIGINT save the current step and a rerun
continues with identical losses."""

import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest
from tiny_runs import opt_train_cmd

from configs import common
from qtx.errors import UserError
from qtx.run.evaluate import load_variables
from qtx.run.prepare import prepare
from qtx.run.train import train
from qtx.train.checkpoint import MANIFEST, Checkpointer, verify_manifest, write_manifest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(steps, **over):
    c = common.opt_clm("gated", "tiny")
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    c.data.update(seq_len=16, batch_size=8, max_eval_batches=1)
    c.train.update(
        steps=steps,
        log_every=1,
        checkpoint_every=3,
        max_eval_batches=1,
        tensorboard=False,
        async_checkpoint=False,
    )
    c.train.update(**over)
    c.optim.update(warmup_steps=0, lr=3e-3, schedule="constant")  # runs of any length agree
    return c


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 9-step run, and a 6-step run (checkpoints 3 and 6) to damage."""
    root = tmp_path_factory.mktemp("ckpt")
    train(tiny(9), str(root / "full"))
    train(tiny(6), str(root / "six"))
    return root


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "train").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def damage(step_dir: pathlib.Path, how: str) -> None:
    p = largest_array_file(step_dir)
    if how == "truncate":
        os.truncate(p, p.stat().st_size // 2)
    else:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x04
        p.write_bytes(bytes(data))


def copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


def test_every_save_gets_a_manifest_that_verifies(reference):
    step_dir = reference / "six" / "checkpoints" / "6"
    assert (step_dir / MANIFEST).is_file()
    assert verify_manifest(str(step_dir)) is None
    lines = (step_dir / MANIFEST).read_text().splitlines()
    assert any(line.endswith("  train/_METADATA") for line in lines)
    r = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=step_dir)
    assert r.returncode == 0


@pytest.mark.parametrize(
    "how,manifest,why",
    [
        ("truncate", True, "SHA-256 mismatch"),
        ("flip", True, "SHA-256 mismatch"),
        ("truncate", False, "it cannot be read"),
    ],
)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes(
    reference, tmp_path, capsys, how, manifest, why
):
    wd = tmp_path / "wd"
    copy(reference / "six", wd)
    damage(wd / "checkpoints" / "6", how)
    if not manifest:  # killed after orbax's commit, before the manifest was written
        (wd / "checkpoints" / "6" / MANIFEST).unlink()
    train(tiny(9), str(wd))
    out = capsys.readouterr().out
    assert "checkpoint step 6 is damaged (" in out
    assert why in out and "using step 3" in out and f"resumed from {wd}/checkpoints/3" in out
    assert (wd / "checkpoints_damaged" / "6" / "train").is_dir()  # kept, never deleted
    full, resumed = losses(reference / "full"), losses(wd)
    assert sorted(resumed) == list(range(1, 10))
    for s in range(1, 10):
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), s


def test_eval_uses_the_newest_intact_checkpoint(reference, tmp_path):
    wd = tmp_path / "wd"
    copy(reference / "six", wd)
    damage(wd / "checkpoints" / "6", "flip")
    exp, mesh, _ = prepare(tiny(6))
    step, params, _ = load_variables(exp, str(wd), None, mesh)
    assert step == 3 and (wd / "checkpoints_damaged" / "6").is_dir()


def test_no_intact_checkpoint_is_one_error_and_moves_nothing(reference, tmp_path):
    wd = tmp_path / "wd"
    copy(reference / "six", wd)
    damage(wd / "checkpoints" / "6", "truncate")
    damage(wd / "checkpoints" / "3", "flip")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step 6: .*; step 3: .*"):
        train(tiny(9), str(wd))
    assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6"]
    assert not (wd / "checkpoints_damaged").exists()


def test_manifest_names_a_missing_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"123")
    write_manifest(str(tmp_path))
    assert verify_manifest(str(tmp_path)) is None
    (tmp_path / "a" / "x.bin").unlink()
    assert verify_manifest(str(tmp_path)) == "a/x.bin is missing"


def _cmd(workdir, steps):
    return opt_train_cmd(workdir, steps, width=32, checkpoint_every=50)


def wait_for_steps(workdir, n, proc=None, timeout=300):
    path, deadline = workdir / "metrics.jsonl", time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc is None or proc.poll() is None, "the run ended early"
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_continues_identically(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    steps = 60
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(full, steps), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        _cmd(cut, steps),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(cut, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 3 <= stopped < steps
    assert os.listdir(cut / "checkpoints") == [str(stopped)]
    assert verify_manifest(str(cut / "checkpoints" / str(stopped))) is None
    assert "Traceback" not in err
    r = subprocess.run(_cmd(cut, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed from {cut}/checkpoints/{stopped}" in r.stdout
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), s


def test_sigint_in_process_stops_after_the_current_step(tmp_path):
    wd = tmp_path / "wd"
    sender = threading.Thread(
        target=lambda: (wait_for_steps(wd, 2), os.kill(os.getpid(), signal.SIGINT)), daemon=True
    )
    before = signal.getsignal(signal.SIGINT)  # default, or ignored under pytest-xdist
    sender.start()
    out = train(tiny(400, checkpoint_every=1000), str(wd))
    sender.join()
    stopped = out["stopped_at"]
    assert 2 <= stopped < 400
    assert Checkpointer(str(wd)).steps() == [stopped]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
