"""Joining the processes of a run on several hosts (or one process per GPU), and ending every
survivor with one line when a process dies.

Launches (``launch_from_env``), checked before any compute:

- one process: no ``JAX_*`` or SLURM variables (or a count of 1); nothing to join.
- the JAX variables, on every process: ``JAX_COORDINATOR_ADDRESS=host:port``,
  ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i`` (0..N-1), optionally
  ``JAX_LOCAL_DEVICE_IDS=0,1,..`` (the GPUs this process drives; default all it sees).
- SLURM (``srun`` with ``SLURM_NTASKS`` > 1): N = ``SLURM_NTASKS``, i = ``SLURM_PROCID``, the
  coordinator is the step's first node on port ``JAX_COORDINATOR_PORT`` (default
  61440 + job id mod 4096, as JAX). One task per node drives all the GPUs it sees; several
  tasks per node drive one GPU each (the GPU SLURM bound to the task, with ``--gpus-per-task``
  or a binding that leaves it one visible device; else GPU number ``SLURM_LOCALID``). A
  ``JAX_*`` variable overrides its SLURM counterpart.

Failures. JAX's runtime runs in its recoverable mode, so the death of a process does not
abort the others; a watchdog thread asks the coordination service which processes are alive
every ``timeout/10`` s (0.2 to 5 s), and once one has sent no heartbeat for ``timeout`` s
(``config.train.distributed_timeout_s``) every survivor prints one line naming it and the
newest complete checkpoint, and exits with status 3. Losing process 0, which hosts the
coordination service, makes JAX abort the others at once (its own fatal log line); an abort
hook prints the same one line (checking that the coordinator no longer answers) and exits
with 3. Processes that never all join within the timeout end with a one-line error (status 2).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping

import jax
from absl import logging as absl_logging

from qtx.errors import UserError

TIMEOUT_FIELD = "config.train.distributed_timeout_s"
PEER_LOST_STATUS = 3
JOIN_FAILED_STATUS = 2
_SIGNAL_KEY = "qtx/stop_signal"
_FINISHED = "qtx/finished/"  # + process id: that process reached the end of the run
# errors of a collective whose peer went away (gloo, NCCL, the coordination service), matched
# on the exception lines of a chain (not on source lines of its traceback)
_TRANSPORT = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED)\b|(?i:\b(gloo|nccl|connection (closed|reset|refused)"
    r"|socket closed|heartbeat|coordination service|barrier)\b)"
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the others."""

    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every device the process sees
    source: str  # 'JAX variables' or 'SLURM'


def _int(env: Mapping[str, str], name: str, low: int, high: int | None, allowed: str) -> int:
    raw = env[name].strip()
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise UserError(f"{name}={env[name]!r} is invalid; allowed: {allowed}.")
    return value


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
    if ranges is None:
        return prefix + suffix
    return prefix + re.split(r"[,-]", ranges)[0] + suffix


def tasks_on_node(env: Mapping[str, str]) -> int:
    """The tasks SLURM started on this node: ``SLURM_STEP_TASKS_PER_NODE`` ('8(x2),4')
    at ``SLURM_NODEID``, else ``SLURM_NTASKS_PER_NODE``, else ntasks / nodes."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts: list[int] = []
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
            if m is None:
                counts = []
                break
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = int(env.get("SLURM_NODEID", "0") or 0)
        if counts and node < len(counts):
            return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    return max(1, int(env["SLURM_NTASKS"]) // max(1, int(nodes)))


def _slurm(env: Mapping[str, str]) -> dict | None:
    if not all(k in env for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID")):
        return None
    n = _int(env, "SLURM_NTASKS", 1, None, "an integer >= 1")
    if n == 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError(
            "SLURM_STEP_NODELIST is not set; allowed: start the processes with srun (or give "
            "JAX_COORDINATOR_ADDRESS=host:port)."
        )
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
    local = None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    bound = env.get("SLURM_GPUS_PER_TASK") or ("CUDA_VISIBLE_DEVICES" in env and len(visible) <= 1)
    if tasks_on_node(env) > 1 and not bound:
        local = (int(env.get("SLURM_LOCALID", "0")),)  # one GPU per task, by local rank
    return {
        "coordinator": f"{first_host(nodelist)}:{port}",
        "num_processes": n,
        "process_id": _int(env, "SLURM_PROCID", 0, n - 1, f"an integer in [0, {n - 1}]"),
        "local_device_ids": local,
    }


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch the environment describes, or None for one process. A half-given or
    malformed setup raises a one-line :class:`UserError` naming the variable."""
    env = os.environ if env is None else env
    jax_vars = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = {k: env[k] for k in (*jax_vars, "JAX_LOCAL_DEVICE_IDS") if env.get(k, "").strip()}
    slurm = _slurm(env)
    if not set(given) & set(jax_vars) and slurm is None:
        return None  # JAX_LOCAL_DEVICE_IDS alone does not make a launch
    found = dict(slurm or {})
    if "JAX_NUM_PROCESSES" in given:
        found["num_processes"] = _int(env, "JAX_NUM_PROCESSES", 1, None, "an integer >= 1")
    if "JAX_COORDINATOR_ADDRESS" in given:
        address = given["JAX_COORDINATOR_ADDRESS"].strip()
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(
                f"JAX_COORDINATOR_ADDRESS={address!r} is invalid; allowed: host:port with a "
                "port in 1..65535 (the address of process 0)."
            )
        found["coordinator"] = address
    missing = [
        name
        for name, key in zip(jax_vars, ("coordinator", "num_processes", "process_id"), strict=True)
        if key not in found and name not in given
    ]
    if "num_processes" in found and found["num_processes"] == 1 and slurm is None:
        return None
    if missing:
        raise UserError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set while "
            f"{', '.join(sorted(given))} {'is' if len(given) == 1 else 'are'}; allowed: all of "
            "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1 "
            "on every process, or none (one process, or SLURM's variables under srun)."
        )
    n = found["num_processes"]
    if "JAX_PROCESS_ID" in given:
        found["process_id"] = _int(
            env, "JAX_PROCESS_ID", 0, n - 1, f"an integer in [0, {n - 1}] (JAX_NUM_PROCESSES={n})"
        )
    if "JAX_LOCAL_DEVICE_IDS" in given:
        ids = given["JAX_LOCAL_DEVICE_IDS"].replace(" ", "").split(",")
        if not all(i.isdigit() for i in ids):
            raise UserError(
                f"JAX_LOCAL_DEVICE_IDS={given['JAX_LOCAL_DEVICE_IDS']!r} is invalid; allowed: "
                "comma-separated device numbers, e.g. 0,1,2,3."
            )
        found["local_device_ids"] = tuple(int(i) for i in ids)
    source = "SLURM" if slurm is not None else "JAX variables"
    return Launch(
        found["coordinator"], n, found["process_id"], found.get("local_device_ids"), source
    )


# -- the state of this process's membership -------------------------------------------------
@dataclasses.dataclass
class _Membership:
    launch: Launch
    timeout_s: float
    phase: str = "joining"  # 'joining' -> 'running' -> 'finishing' -> 'finished'
    completed: bool = False  # every process reached the end (the finish barrier passed)
    checkpoints: str | None = None  # where the failure line looks for the newest checkpoint
    newest: Callable[[str], int | None] | None = None
    watchdog: threading.Thread | None = None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


_STATE: _Membership | None = None
_ABORT_HANDLER = None  # keeps the ctypes callback alive


def _client():
    """JAX's coordination-service client of this process (None before it joined)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _period(timeout_s: float) -> float:
    return min(5.0, max(0.2, timeout_s / 10))


def _say_and_exit(line: str, status: int) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    os.write(2, f"error: {line}\n".encode())
    os._exit(status)


def _resume_hint(state: _Membership) -> str:
    newest = None
    if state.checkpoints and state.newest is not None:
        try:
            newest = state.newest(state.checkpoints)
        except OSError:
            newest = None
    where = (
        f"the newest complete checkpoint is {state.checkpoints}/{newest}"
        if newest is not None
        else "no checkpoint was completed yet"
    )
    return f"{where}; rerun the same command on every process to continue."


def _lost(state: _Membership, dead: list[int], why: str) -> None:
    n = state.launch.num_processes
    who = ", ".join(str(i) for i in dead)
    _say_and_exit(
        f"process {who} of {n} {why}; " + _resume_hint(state),
        PEER_LOST_STATUS,
    )


def _coordinator_answers(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _on_abort(signum) -> None:
    """SIGABRT from JAX's runtime (its fatal log line is already on stderr)."""
    state = _STATE
    if state is None or state.phase == "finished":
        # after the finish barrier only teardown is left: losing the service there is benign
        os._exit(0 if state is not None and state.completed else 128 + signal.SIGABRT)
    launch = state.launch
    if state.phase == "joining":
        _say_and_exit(
            f"the {launch.num_processes} processes did not all join the coordinator at "
            f"{launch.coordinator} within {state.timeout_s:g} s ({TIMEOUT_FIELD}); allowed: "
            f"start every process with the same coordinator and process count and a distinct "
            f"process id ({launch.source}), with process 0 reachable at that address.",
            JOIN_FAILED_STATUS,
        )
    if launch.process_id != 0 and not _coordinator_answers(launch.coordinator):
        _lost(state, [0], f"is gone (the coordinator at {launch.coordinator} does not answer)")
    os.write(2, b"error: the JAX runtime aborted this process (its message is above).\n")
    os._exit(128 + signal.SIGABRT)


def _install_abort_hook() -> None:
    """A C-level SIGABRT handler that runs :func:`_on_abort` (JAX's runtime ends a process
    that lost the coordination service with ``abort()``, which Python cannot catch)."""
    global _ABORT_HANDLER
    if _ABORT_HANDLER is not None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    _ABORT_HANDLER = handler_type(_on_abort)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    libc.signal(signal.SIGABRT, _ABORT_HANDLER)


def _watch(state: _Membership) -> None:
    """Polls the coordination service's live processes; a missing one ends this process."""
    client = _client()
    ids = list(range(state.launch.num_processes))
    while not state.stop.wait(_period(state.timeout_s)):
        try:
            live = client.get_live_nodes(ids)
        except Exception:  # noqa: BLE001 - the service is gone: the abort hook reports it
            continue
        dead = [i for i in ids if i not in live]
        if dead:  # a process that reached the end (see finish) is not lost
            try:
                done = {k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(_FINISHED)}
            except Exception:  # noqa: BLE001 - the service is gone: the abort hook reports it
                continue
            dead = [i for i in dead if str(i) not in done]
        if dead and not state.stop.is_set():
            _lost(
                state,
                dead,
                f"is gone (it exited, or sent no heartbeat for {state.timeout_s:g} s: "
                f"{TIMEOUT_FIELD})",
            )


def join(timeout_s: float, env: Mapping[str, str] | None = None) -> Launch | None:
    """Joins the other processes when launched as several (see the module docstring);
    returns the launch, or None for one process. Call before any JAX computation."""
    global _STATE
    launch = launch_from_env(env)
    if launch is None or jax.distributed.is_initialized():
        return launch
    timeout = max(1, int(round(timeout_s)))
    _STATE = _Membership(launch, float(timeout_s))
    _install_abort_hook()
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
            cluster_detection_method="deactivate",
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=timeout,
            shutdown_timeout_seconds=timeout,
        )
    except Exception as e:  # noqa: BLE001 - jax raises several kinds for a bad address
        raise UserError(
            f"could not join the {launch.num_processes} processes at {launch.coordinator} "
            f"({launch.source}): {' '.join(str(e).split())[:200]}; allowed: an address of "
            "process 0's host with a free port."
        ) from e
    _STATE.phase = "running"
    absl_logging.get_absl_handler().addFilter(_DeferLostPeerLogs())
    threading.excepthook = _defer_thread_tracebacks(threading.excepthook)
    _STATE.watchdog = threading.Thread(
        target=_watch, args=(_STATE,), name="qtx-peer-watchdog", daemon=True
    )
    _STATE.watchdog.start()
    atexit.register(finish)  # runs before JAX's shutdown (atexit is last-in, first-out)
    return launch


def watch_checkpoints(directory: str, newest: Callable[[str], int | None]) -> None:
    """Names ``newest(directory)`` in the line a lost process prints."""
    if _STATE is not None:
        _STATE.checkpoints, _STATE.newest = directory, newest


def finish() -> None:
    """Ends this process's part. It records that it reached the end (so the others do not
    report it lost), waits for them at a barrier (JAX's shutdown does not, in recoverable
    mode), and process 0, the host of the coordination service, leaves last."""
    state = _STATE
    if state is None or state.phase != "running":
        return
    state.phase = "finishing"
    client = _client()
    try:
        client.key_value_set(f"{_FINISHED}{state.launch.process_id}", "1", allow_overwrite=True)
        client.wait_at_barrier("qtx/finish", int(state.timeout_s * 1000))
        state.completed = True
    except Exception:  # noqa: BLE001 - a peer gone at the end: nothing left to share
        pass
    state.phase = "finished"
    state.stop.set()
    if state.completed and state.launch.process_id == 0:
        ids = list(range(state.launch.num_processes))

        def others_left():  # get_live_nodes waits for every live process: bounded below
            while len(client.get_live_nodes(ids)) > 1:
                time.sleep(0.05)

        waiter = threading.Thread(target=others_left, name="qtx-finish", daemon=True)
        waiter.start()
        waiter.join(state.timeout_s)


def _wait_for_verdict() -> None:
    """Sleeps until the watchdog or the abort hook ends this process (it names the lost
    process), at most the timeout and three polls; returns if neither does."""
    state = _STATE
    if state is None or state.phase not in ("running", "finishing"):
        return
    deadline = time.monotonic() + state.timeout_s + 3 * _period(state.timeout_s)
    while time.monotonic() < deadline and state.phase in ("running", "finishing"):
        time.sleep(0.1)


def _exception_lines(err: BaseException | None) -> str:
    """``Type: message`` of ``err`` and of every exception chained to it."""
    lines, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        lines += traceback.format_exception_only(type(err), err)
        err = err.__cause__ or err.__context__
    return "".join(lines)


def _lost_peer(err: BaseException | None) -> bool:
    state = _STATE
    return (
        state is not None
        and state.phase in ("running", "finishing")
        and bool(_TRANSPORT.search(_exception_lines(err)))
    )


def await_verdict(err: BaseException) -> None:
    """After ``err`` in a multi-process run: when it looks like a collective that lost its
    peer, waits for the one-line verdict (see :func:`_wait_for_verdict`); returns otherwise,
    and then the caller reports ``err``."""
    if _lost_peer(err):
        _wait_for_verdict()


class _DeferLostPeerLogs(logging.Filter):
    """Holds back a logged traceback of a collective or barrier that lost its peer (orbax's
    save thread logs one) until the verdict line has ended the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _lost_peer(record.exc_info[1]):
            _wait_for_verdict()
        return True


def _defer_thread_tracebacks(previous):
    def hook(args):
        if _lost_peer(args.exc_value):
            _wait_for_verdict()
        previous(args)

    return hook


# -- a stop signal shared by every process --------------------------------------------------
def announce_signal(name: str) -> None:
    """Records that this process was asked to stop by ``name`` (read by the others)."""
    client = _client()
    if client is not None:
        try:
            client.key_value_set(_SIGNAL_KEY, name, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the message only loses the signal's name
            pass


def announced_signal(default: str = "SIGTERM") -> str:
    """The signal some process announced, else ``default`` (SIGTERM is what JAX's preemption
    notice carries)."""
    client = _client()
    if client is not None:
        try:
            return client.key_value_try_get(_SIGNAL_KEY) or default
        except Exception:  # noqa: BLE001 - not set
            return default
    return default
