"""Where a jitted function's time goes: XLA:CPU's per-op profile, split into matmuls and the
rest (used by ``bench/int8.py``; importable for ad-hoc profiles)::

    from bench.op_profile import op_split
    split = op_split(jax.jit(f), args, calls=3)   # {"matmul_ms", "other_ms", "top": [...]}

The function is compiled, then run ``calls`` times under ``jax.profiler.trace`` (a Perfetto
trace). Every executed HLO instruction (a thunk: a fusion, a dot, a custom call) appears
in the trace under its HLO name; an instruction is a *matmul* when it is a ``dot`` /
``convolution`` or a fusion whose computation contains one (its fused prologue and
epilogue included: a dequantising epilogue counts as matmul time, as it would in a library
kernel). Times are summed per instruction over the calls and divided by ``calls``;
instructions of the two cores' thread pool overlap in time, so the sum can exceed the wall
time per call. The trace itself costs a little; compare splits, not absolute times.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import shutil
import tempfile

import jax

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^ ]+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def matmul_instructions(hlo_text: str) -> set[str]:
    """Names of the instructions of an optimized HLO module that are (or fuse) a dot or a
    convolution, at any nesting of called computations."""
    body: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line.strip())
        if m:
            current = m.group(1)
            body[current] = []
        elif current is not None:
            body[current].append(line)

    memo: dict[str, bool] = {}

    def has_dot(comp: str) -> bool:
        if comp not in memo:
            memo[comp] = False  # cycles cannot occur; guards recursion
            for line in body.get(comp, ()):
                m = _INSTRUCTION.match(line)
                if m and m.group(2) in ("dot", "convolution"):
                    memo[comp] = True
                    break
                if any(has_dot(c) for c in _CALLS.findall(line)):
                    memo[comp] = True
                    break
        return memo[comp]

    names = set()
    for lines in body.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            if m.group(2) in ("dot", "convolution") or any(
                has_dot(c) for c in _CALLS.findall(line)
            ):
                names.add(m.group(1))
    return names


def op_split(jitted, args, calls: int = 3, top: int = 8) -> dict:
    """``{"matmul_ms", "other_ms", "top"}`` per call of ``jitted(*args)`` (see module)."""
    hlo = jitted.lower(*args).compile().as_text()
    matmuls = matmul_instructions(hlo)
    instructions = {m.group(1) for m in map(_INSTRUCTION.match, hlo.splitlines()) if m}
    jax.block_until_ready(jitted(*args))
    where = tempfile.mkdtemp(prefix="qtx_profile_")
    try:
        with jax.profiler.trace(where, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(jitted(*args))
        (path,) = glob.glob(f"{where}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instructions:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / calls
    mm = sum(t for n, t in per_op.items() if n in matmuls)
    other = sum(t for n, t in per_op.items() if n not in matmuls)
    return {
        "matmul_ms": mm,
        "other_ms": other,
        "top": [{"op": n, "ms": t, "matmul": n in matmuls} for n, t in per_op.most_common(top)],
    }
