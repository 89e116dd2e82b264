"""Shared helpers of the benchmark scripts: timing, machine description, tables and JSON.

Timing protocol (every script): each case is called ``warmup`` times first (the first call
compiles; its time is kept separately as ``first_call_ms``) and sized (calls per sample),
then ``repeats`` timed samples. Cases that are compared with each other are timed
*interleaved* (round ``r`` takes one sample of every case, in a fixed order), so that slow
drifts of a noisy machine hit all cases alike.
Every call ends in ``jax.block_until_ready`` (or a host sync for PyTorch) inside the timed
region; times come from ``time.perf_counter``. Summaries report the median, min and max.

On a shared machine every sample also records how many cores *other* processes kept busy
while it ran (``/proc/stat`` minus this process's own CPU time). Samples under
``QUIET_CORES`` are "quiet"; ``quiet_median_ms`` and the ratios over quiet rounds only are
reported next to the plain medians, which stay the headline numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable

import jax

QUIET_CORES = 0.3  # a sample is quiet when other processes kept fewer cores busy meanwhile


def base_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """Parser with the flags every script shares: ``--repeats``, ``--quick``, ``--out``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=7, help="timed calls per case (default 7)")
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases (< 60 s)")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".json"),
        help=f"JSON results path (default bench/results/{name}.json)",
    )
    return p


def summarize(times_s: list[float], others: list[float] | None = None) -> dict:
    """Median / min / max / all of seconds, in ms; with ``others`` (cores other processes kept
    busy per sample) also the median of the quiet samples."""
    ms = [t * 1e3 for t in times_s]
    out = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
    if others is not None:
        quiet = [t for t, o in zip(ms, others, strict=True) if o < QUIET_CORES]
        out["quiet_median_ms"] = statistics.median(quiet) if quiet else None
        out["quiet_samples"] = len(quiet)
        out["other_cores"] = others
    return {**out, "times_ms": ms}


def measure(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
) -> dict[str, dict]:
    """Times zero-argument callables interleaved; each must block until its work is done.

    One timed sample of a case is ``number`` back-to-back calls (reported per call), where
    ``number`` is the smallest count reaching ``min_sample_s`` (1 for slow cases), which
    averages out timer and dispatch jitter of sub-millisecond calls. Returns
    ``{name: summarize(...) | {"first_call_ms", "calls_per_sample", "page_faults_per_call"}}``
    (minor page faults of the process per call, a sign of freshly mapped buffers).
    """
    first, number = {}, {}
    for name, call in cases.items():
        for i in range(max(warmup, 1)):
            t0 = time.perf_counter()
            call()
            if i == 0:
                first[name] = (time.perf_counter() - t0) * 1e3
        k = 1  # warm time per call: double k until k calls take min_sample_s / 2
        while True:
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            dt = time.perf_counter() - t0
            if dt >= min_sample_s / 2 or k >= 1 << 16:
                break
            k *= 2
        number[name] = max(1, math.ceil(min_sample_s * k / max(dt, 1e-9)))
    times = {name: [] for name in cases}
    others = {name: [] for name in cases}
    faults = dict.fromkeys(cases, 0)
    for _ in range(repeats):
        for name, call in cases.items():
            k = number[name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            probe = ForeignLoad()
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            times[name].append((time.perf_counter() - t0) / k)
            others[name].append(probe.cores())
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {
        n: {
            **summarize(times[n], others[n]),
            "first_call_ms": first[n],
            "calls_per_sample": number[n],
            # fresh pages touched per call: XLA CPU buffers > 32 MiB are mmap'ed per call
            "page_faults_per_call": faults[n] / max(repeats * number[n], 1),
        }
        for n in cases
    }


def paired_ratio(a: dict, b: dict, quiet: bool = False) -> float | None:
    """Median over rounds of ``a_r / b_r`` for two cases timed interleaved by :func:`measure`
    (robust to slow drifts of the machine's load); ``quiet``: only rounds in which both
    samples were quiet (None if there is none)."""
    pairs = zip(a["times_ms"], b["times_ms"], a["other_cores"], b["other_cores"], strict=True)
    r = [x / y for x, y, oa, ob in pairs if not quiet or max(oa, ob) < QUIET_CORES]
    return statistics.median(r) if r else None


def blocking(fn: Callable, *args) -> Callable[[], object]:
    """``() -> jax.block_until_ready(fn(*args))``."""
    return lambda: jax.block_until_ready(fn(*args))


def _busy_s() -> float:
    """CPU seconds all processes of the machine spent busy (``/proc/stat``), else 0."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ForeignLoad:
    """How many cores *other* processes kept busy since construction: the machine's busy CPU
    time (``/proc/stat``, 10 ms ticks) minus this process's own, per second of wall time.
    Near 0: a quiet machine; near 1 on 2 cores: every parallel step competed for a core."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        own = _own_s() - self.own0
        return max(_busy_s() - self.busy0 - own, 0.0) / max(wall, 1e-9)


def proc_status_bytes(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, else 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def release_free_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc ``malloc_trim``), so
    that the RSS is a fair baseline for the memory of what comes next."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, above its RSS at entry
    (taken after :func:`release_free_memory`).

    A background thread samples ``VmRSS`` every ``interval_s``; where the kernel lets the
    process reset its high-water mark (``echo 5 > /proc/self/clear_refs``), ``VmHWM`` at exit
    also catches peaks between samples. ``info()`` gives MiB: ``rss_before``,
    ``peak_delta`` (the larger of the two peaks minus ``rss_before``), ``sampled_peak_delta``,
    ``hwm_delta`` (None without the reset) and the sample count.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.before = self.sampled = self.samples = 0
        self.hwm: int | None = None

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.before = self.sampled = proc_status_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled = max(self.sampled, proc_status_bytes())
            self.samples += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, proc_status_bytes())
        self.hwm = proc_status_bytes("VmHWM") if self._hwm_reset else None

    def info(self) -> dict:
        mib = 1 / 2**20
        peak = max(self.sampled, self.hwm or 0)
        return {
            "rss_before": self.before * mib,
            "peak_delta": (peak - self.before) * mib,
            "sampled_peak_delta": (self.sampled - self.before) * mib,
            "hwm_delta": None if self.hwm is None else (self.hwm - self.before) * mib,
            "samples": self.samples,
        }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_isa() -> list[str]:
    """The vector instruction sets the CPU reports (AVX2, AVX-512 subsets, AMX, FMA)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def matmul_peak(n: int, dtype, repeats: int) -> dict:
    """Median time of a jitted ``a @ a`` (n x n) -> FLOP/s = 2 n^3 / t."""
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    r = measure({"mm": blocking(jax.jit(jnp.matmul), a, a)}, repeats, min_sample_s=0.2)["mm"]
    return {"n": n, "dtype": jnp.dtype(dtype).name, **r, "flops": 2 * n**3 / r["median_ms"] * 1e3}


def int8_matmul_peak(n: int, repeats: int) -> dict:
    """Median time of a jitted int8 x int8 -> int32 ``a @ a`` (n x n) -> OP/s = 2 n^3 / t
    (the key ``flops``, as :func:`matmul_peak`)."""
    import jax.numpy as jnp

    a = jax.random.randint(jax.random.key(0), (n, n), -127, 128, jnp.int32).astype(jnp.int8)
    dot = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32))
    r = measure({"mm": blocking(dot, a, a)}, repeats, min_sample_s=0.2)["mm"]
    return {"n": n, "dtype": "int8", **r, "flops": 2 * n**3 / r["median_ms"] * 1e3}


def machine_info() -> dict:
    """Device, versions, CPU and its instruction sets of this run (stored in every JSON)."""
    dev = jax.devices()[0]
    return {
        "cpu_isa": cpu_isa(),
        "backend": jax.default_backend(),
        "device": str(dev),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_cores_available": available_cores(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "platform": platform.platform(),
        "load_average_1_5_15min": os.getloadavg(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table; floats get 3 significant-ish decimals."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:,.2f}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


class Run:
    """One benchmark run: wall clock, machine description and the load of other processes."""

    def __init__(self, name: str):
        self.name, self.t0 = name, time.perf_counter()
        self.machine, self.others = machine_info(), ForeignLoad()

    def finish(self, path: str, **payload) -> None:
        """Prints the total time and the other processes' load; writes the JSON."""
        elapsed, busy = time.perf_counter() - self.t0, self.others.cores()
        print(f"\ntotal {elapsed:.1f} s; other processes kept {busy:.2f} cores busy meanwhile")
        machine = {
            **self.machine,
            "load_average_at_end": os.getloadavg(),
            "other_processes_busy_cores": busy,
        }
        write_json(
            path, {"benchmark": self.name, "machine": machine, **payload, "elapsed_s": elapsed}
        )


def machine_summary(peak_gflops: float) -> str:
    """'2 cores of an <CPU> (AVX-512, f32 matmul peak N GFLOP/s)' (README lines)."""
    isa = cpu_isa()
    top = "AVX-512" if any(f.startswith("avx512") for f in isa) else "AVX2" if "avx2" in isa else ""
    what = ", ".join(x for x in (top, f"f32 matmul peak {peak_gflops:.0f} GFLOP/s") if x)
    return f"{available_cores()} cores of an {cpu_model()} ({what})"


def rewrite_block(text: str, marker: str, body: str, inline: bool = False) -> str:
    """``text`` with the body between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced
    (exits when the markers are missing)."""
    m = re.escape(marker)
    pattern = re.compile(rf"(<!-- {m} -->)(.*?)(<!-- /{m} -->)", re.DOTALL)
    if not pattern.search(text):
        sys.exit(f"README.md has no <!-- {marker} --> block")
    sep = "" if inline else "\n"
    return pattern.sub(lambda m: f"{m.group(1)}{sep}{body}{sep}{m.group(3)}", text)


def rewrite_readme(marker: str, body: str) -> None:
    """Rewrites the ``<!-- marker -->`` block of the repository's README.md with ``body``."""
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(rewrite_block(text, marker, body))
    print(f"rewrote the {marker} block of README.md")


def binomial_se(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy (a fraction) measured on ``n`` examples, in
    points: ``100 sqrt(acc (1 - acc) / n)``."""
    return 100 * math.sqrt(acc * (1 - acc) / n)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"wrote {path}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def get_config(spec: str):
    """``path[:arg]`` (relative to the repository) -> the config of ``get_config(arg)``."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # the config files import ``configs.common``
    name = "bench_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)
