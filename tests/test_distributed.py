"""How a process learns its place in a multi-process run (qtx.train.distributed): the JAX
variables, SLURM's (both GPU layouts), the one-process default, and one-line errors for a
half-given or malformed launch. The real multi-process runs are in test_multiprocess.py."""

import os
import pathlib
import subprocess
import sys

import pytest

from qtx.errors import UserError
from qtx.run import experiment
from qtx.train.distributed import Launch, first_host, launch_from_env, tasks_on_node

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}


def slurm(ntasks, procid, localid, per_node, nodelist="gpu[003-004]", nodeid=0, **extra):
    return {
        "SLURM_JOB_ID": "4100",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": per_node,
        **extra,
    }


def test_one_process_needs_nothing():
    assert launch_from_env({}) is None
    assert launch_from_env({"JAX_NUM_PROCESSES": "1"}) is None
    assert launch_from_env({"JAX_LOCAL_DEVICE_IDS": "0"}) is None
    assert launch_from_env(slurm(1, 0, 0, "1")) is None  # srun -n 1


def test_jax_variables():
    assert launch_from_env(JAX) == Launch("10.0.0.1:1234", 4, 3, None, "JAX variables")
    got = launch_from_env({**JAX, "JAX_LOCAL_DEVICE_IDS": "0, 1"})
    assert got.local_device_ids == (0, 1)


@pytest.mark.parametrize(
    "env, match",
    [
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1"},
            r"^JAX_NUM_PROCESSES and JAX_PROCESS_ID are not set while JAX_COORDINATOR_ADDRESS "
            r"is; allowed: all of",
        ),
        (
            {k: v for k, v in JAX.items() if k != "JAX_PROCESS_ID"},
            r"^JAX_PROCESS_ID is not set while JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES are",
        ),
        ({**JAX, "JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID='4' is invalid; allowed: .*\[0, 3\]"),
        ({**JAX, "JAX_PROCESS_ID": "x"}, r"JAX_PROCESS_ID='x' is invalid"),
        ({**JAX, "JAX_NUM_PROCESSES": "0"}, r"JAX_NUM_PROCESSES='0' is invalid; allowed: an"),
        ({**JAX, "JAX_COORDINATOR_ADDRESS": "host0"}, r"JAX_COORDINATOR_ADDRESS='host0' is"),
        ({**JAX, "JAX_COORDINATOR_ADDRESS": "h:70000"}, r"port in 1\.\.65535"),
        ({**JAX, "JAX_LOCAL_DEVICE_IDS": "0;1"}, r"JAX_LOCAL_DEVICE_IDS='0;1' is invalid"),
    ],
)
def test_half_given_or_malformed_launch_is_one_line(env, match):
    with pytest.raises(UserError, match=match) as e:
        launch_from_env(env)
    assert "\n" not in str(e.value)


def test_slurm_one_process_per_node_drives_all_its_gpus():
    # srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8; job 4100 -> port 61440 + 4
    got = launch_from_env(slurm(2, 1, 0, "1(x2)", nodeid=1))
    assert got == Launch("gpu003:61444", 2, 1, None, "SLURM")


def test_slurm_one_process_per_gpu():
    # srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8: task 9 is the 2nd on node 1
    got = launch_from_env(slurm(16, 9, 1, "8(x2)", nodeid=1))
    assert (got.num_processes, got.process_id, got.local_device_ids) == (16, 9, (1,))
    # --gpus-per-task=1: SLURM already shows each task only its GPU
    got = launch_from_env(slurm(16, 9, 1, "8(x2)", nodeid=1, SLURM_GPUS_PER_TASK="1"))
    assert got.local_device_ids is None
    # a binding (--gpu-bind=single:1, map_gpu) that leaves the task one visible device
    got = launch_from_env(slurm(16, 9, 1, "8(x2)", nodeid=1, CUDA_VISIBLE_DEVICES="5"))
    assert got.local_device_ids is None
    got = launch_from_env(slurm(16, 9, 1, "8(x2)", nodeid=1, CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert got.local_device_ids == (1,)


def test_jax_variables_override_slurm():
    env = slurm(16, 9, 1, "8(x2)", nodeid=1, JAX_COORDINATOR_PORT="5000")
    assert launch_from_env(env).coordinator == "gpu003:5000"
    env.update(JAX_COORDINATOR_ADDRESS="head:7000", JAX_LOCAL_DEVICE_IDS="2,3")
    got = launch_from_env(env)
    assert (got.coordinator, got.local_device_ids) == ("head:7000", (2, 3))


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,001-005]", "node007"),
        ("rack1-[12-13]-ib", "rack1-12-ib"),
    ],
)
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_on_node():
    assert tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1"}) == 1
    assert tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "4(x3),2", "SLURM_NODEID": "3"}) == 2
    assert tasks_on_node({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2"}) == 8


@pytest.mark.parametrize("value", [0, 0.5, -60])
def test_distributed_timeout_is_checked(value):
    from configs import common

    c = common.opt_clm("gated", "tiny")
    c.train.distributed_timeout_s = value
    with pytest.raises(UserError, match=r"config\.train\.distributed_timeout_s=.* seconds >= 1"):
        experiment.load(c)


def test_half_given_launch_fails_in_one_line_before_anything_is_written(tmp_path):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
    }
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/opt125m_gated.py:tiny",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: JAX_PROCESS_ID is not set while JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
        "are; allowed: all of JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and "
        "JAX_PROCESS_ID=0..N-1 on every process, or none (one process, or SLURM's variables "
        "under srun)."
    ]
    assert not (tmp_path / "run").exists()
