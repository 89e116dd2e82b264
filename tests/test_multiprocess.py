"""Several real processes on one machine (CPU, gloo over 127.0.0.1), launched as the README's
multi-host command: ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

Two processes of one CPU device each train the ``:tiny`` OPT with ``fsdp=2`` with the losses
of one process on a mesh of two virtual devices; the checkpoint they write resumes in one
process; Ctrl-C to one of them stops both after the same step; and killing one makes the
other exit with one line that names it and the newest checkpoint (slow: each run starts two
Python processes)."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FLAGS = [
    "--config.mesh.fsdp=2",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.max_eval_batches=2",
    "--config.train.tensorboard=False",
    "--config.train.distributed_timeout_s=5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int, **extra) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
        **extra,
    }


def train_cmd(workdir, steps: int, *extra) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config=configs/opt125m_gated.py:tiny",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        *FLAGS,
        *extra,
    ]


def start_two(workdir, steps: int, *extra, log_dir=None) -> list[subprocess.Popen]:
    """The README's multi-host command on two processes of one device each."""
    port, procs = free_port(), []
    for i in range(2):
        env = env_for(
            1,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        logs = pathlib.Path(log_dir or workdir.parent)
        with open(logs / f"p{i}.log", "w") as out, open(logs / f"p{i}.err", "w") as err:
            p = subprocess.Popen(
                train_cmd(workdir, steps, *extra), cwd=ROOT, env=env, stdout=out, stderr=err
            )
        p.err_path = logs / f"p{i}.err"
        procs.append(p)
    return procs


def finish(procs, timeout=300) -> list[tuple[int, str]]:
    """``(status, stderr)`` of each process once it has ended."""
    return [(p.wait(timeout=timeout), p.err_path.read_text()) for p in procs]


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def wait_for_step(workdir, step: int, procs, timeout=240) -> None:
    deadline = time.time() + timeout
    while not (workdir / "metrics.jsonl").exists() or max(losses(workdir), default=0) < step:
        assert all(p.poll() is None for p in procs), [e[-2000:] for _, e in finish(procs)]
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.1)


def test_two_processes_train_like_one_and_resume_in_one(tmp_path):
    ref, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run(
        train_cmd(ref, 6), cwd=ROOT, env=env_for(2), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for status, err in finish(start_two(two, 3)):
        assert status == 0, err[-3000:]
    want, got = losses(ref), losses(two)
    assert sorted(got) == [1, 2, 3]
    for s in got:  # the same global batch and mesh; only the transport of the sums differs
        assert got[s] == pytest.approx(want[s], rel=1e-6), s
    assert (two / "checkpoints" / "3" / "SHA256SUMS").exists()
    # the two-process checkpoint continues in one process with the reference's losses
    r = subprocess.run(
        train_cmd(two, 6), cwd=ROOT, env=env_for(2), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {two}/checkpoints/3" in r.stdout
    got = losses(two)
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], rel=1e-6), s


def test_sigint_to_one_process_stops_both_after_the_same_step(tmp_path):
    wd = tmp_path / "run"
    procs = start_two(wd, 500)
    wait_for_step(wd, 4, procs)
    os.kill(procs[1].pid, signal.SIGINT)
    results = finish(procs, timeout=120)
    assert [s for s, _ in results] == [0, 0], [e[-2000:] for _, e in results]
    out = (tmp_path / "p0.log").read_text()
    m = re.search(r"stopped by SIGINT after step (\d+): checkpoint saved in (\S+)/(\d+);", out)
    assert m, out[-2000:]
    step = int(m.group(1))
    assert m.group(2) == f"{wd}/checkpoints" and int(m.group(3)) == step
    assert max(losses(wd)) == step  # no process ran past the step both saved
    assert "stopped by" not in (tmp_path / "p1.log").read_text()  # process 0 speaks


def test_killing_one_process_ends_the_other_with_one_line(tmp_path):
    wd = tmp_path / "run"
    procs = start_two(wd, 500)
    wait_for_step(wd, 7, procs)
    while not (wd / "checkpoints" / "6").is_dir():  # orbax completes the save of step 6
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].kill()
    t0 = time.time()
    status, err = finish(procs[:1], timeout=60)[0]
    took = time.time() - t0
    procs[1].wait()
    assert status == 3, err[-3000:]
    assert took < 5 + 20, took  # the timeout (5 s), a few polls, a loaded machine
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(
        r"error: process 1 of 2 is gone \(it exited, or sent no heartbeat for 5 s: config\."
        r"train\.distributed_timeout_s\); the newest complete checkpoint is (\S+)/(\d+); rerun the "
        r"same command on every process to continue\.",
        lines[0],
    )
    assert m and m.group(1) == f"{wd}/checkpoints" and int(m.group(2)) >= 6, lines[0]
    print(f"survivor exited {took:.1f} s after its peer was killed")


def test_a_process_whose_peers_never_come_ends_in_one_line(tmp_path):
    env = env_for(
        1,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID="1",
    )
    cmd = train_cmd(tmp_path / "run", 10)[:-1] + ["--config.train.distributed_timeout_s=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert lines == [
        "error: the 2 processes did not all join the coordinator at "
        f"{env['JAX_COORDINATOR_ADDRESS']} within 2 s (config.train.distributed_timeout_s); "
        "allowed: start every process with the same coordinator and process count and a "
        "distinct process id (JAX variables), with process 0 reachable at that address."
    ]
    assert not (tmp_path / "run").exists()
