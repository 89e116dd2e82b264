"""Integer (int8) inference against float32 and fake quant: forward latency, where the time
goes, and weight memory.

Command (from the repository root; about 12 minutes on 2 cores)::

    python bench/int8.py                  # opt-125m and bert-base, W8A8, 1x128, 8x128, 8x512
    python bench/int8.py --quick          # opt-tiny and bert-tiny, 1x128 and 8x128
    python bench/int8.py --sizes 2x256 --setup W8A8 --repeats 11 --out /tmp/int8.json
    python bench/int8.py --readme_only    # rewrite the README table from the JSON

For each model (random weights: the speed and size do not depend on their values) the setup
is calibrated on two random batches and converted (``qtx.evaluate.integer``). Per batch x
sequence size, three jitted forwards run on the same tokens, timed interleaved
(``bench/common.py``):

* ``fp32``: the float model;
* ``fake quant``: the setup in fake quant (what eval.py evaluates);
* ``int8``: the integer model: int8 weights (the tied embedding as int8 rows), every
  quantized matmul an int8 x int8 -> int32 ``dot_general`` with the zero-point bias from
  column sums stored at conversion and one rescale.

Reported per case: the median latency and the paired ratios (int8 / fp32, int8 / fake quant);
the time split between matmuls and everything else, from XLA's per-op profile
(``bench/op_profile.py``: a fusion that contains a dot counts as matmul time); and, as the
physical reference, one FFN matmul of the same token count (tokens x 768 x 3072) in float32
and int8 alone. Per model: the weight bytes of each form. The CPU model, its instruction sets
and the measured float32 and int8 matmul peaks (2048^2) are printed and stored with the JSON
(``bench/results/int8.json``), which also rewrites the README's ``bench:int8`` block.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import (  # noqa: E402
    Run,
    base_parser,
    blocking,
    cpu_isa,
    matmul_peak,
    measure,
    paired_ratio,
    rewrite_readme,
    table,
)
from bench.op_profile import op_split  # noqa: E402
from qtx import quant  # noqa: E402
from qtx.evaluate.integer import to_integer  # noqa: E402
from qtx.evaluate.ptq import calibrate_setup  # noqa: E402
from qtx.models import build, dummy_inputs, model_config  # noqa: E402
from qtx.quant.convert import tree_bytes  # noqa: E402

ISA_SHOWN = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx512f", "avx_vnni", "avx2")


def tokens(cfg, batch: int, seq: int, seed: int):
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 4, cfg.vocab_size)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x512"`` -> ``[(1, 128), (8, 512)]``."""
    try:
        sizes = [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        sys.exit(f"--sizes {text!r} is invalid; allowed: comma-separated BATCHxSEQ, e.g. 1x128")
    return sizes


def bench_model(name, setup, sizes, repeats, profile_calls) -> dict:
    cfg = model_config(name, {"dropout": 0.0, "attention_dropout": 0.0})
    params = jax.jit(build(cfg).init)(jax.random.key(0), **dummy_inputs(cfg))["params"]
    plan = quant.QuantPlan(quant.setup_rules(setup), mode="quantize")
    b0, t0 = sizes[0]
    variables = calibrate_setup(cfg, plan, params, [tokens(cfg, b0, t0, s) for s in (1, 2)])
    iplan, int_vars, report = to_integer(cfg, plan, variables)

    def forward(model):
        return jax.jit(lambda v, inputs: model.apply(v, **inputs)["logits"])

    fns = {
        "fp32": (forward(build(cfg)), {"params": params}),
        "fake quant": (forward(build(cfg, plan)), variables),
        "int8": (forward(build(cfg, iplan)), int_vars),
    }
    cases = []
    for batch, seq in sizes:
        x = tokens(cfg, batch, seq, 3)
        times = measure({c: blocking(f, v, x) for c, (f, v) in fns.items()}, repeats)
        split = {c: op_split(fns[c][0], (fns[c][1], x), profile_calls) for c in ("fp32", "int8")}
        cases.append(
            {
                "batch": batch,
                "seq_len": seq,
                "times": times,
                "ratios": {
                    "int8 / fp32": paired_ratio(times["int8"], times["fp32"]),
                    "int8 / fake quant": paired_ratio(times["int8"], times["fake quant"]),
                    "fake quant / fp32": paired_ratio(times["fake quant"], times["fp32"]),
                },
                "split": split,
                "ffn_matmul": bench_matmul(batch * seq, 768, 3072, repeats),
            }
        )
        print(
            f"  {name} {batch}x{seq}: "
            + ", ".join(f"{c} {t['median_ms']:.1f} ms" for c, t in times.items())
        )
    return {
        "model": name,
        "setup": setup,
        "cases": cases,
        "weight_bytes": {
            "fp32": tree_bytes(params),
            "fake quant": tree_bytes(variables),
            "int8": report.weight_bytes,
        },
        "integer_matmuls": len(report.integer_matmuls),
        "float_matmuls": report.float_matmuls,
    }


def _pair(m: int, k: int, n: int):
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (m, k))
    b = jax.random.normal(keys[1], (k, n))
    a8, b8 = (jnp.clip(jnp.round(t * 30), -128, 127).astype(jnp.int8) for t in (a, b))
    f32 = jax.jit(lambda x, y: x @ y)
    i8 = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32))
    return {"float32": blocking(f32, a, b), "int8": blocking(i8, a8, b8)}


def bench_matmul(m: int, k: int, n: int, repeats: int) -> dict:
    """``(m, k) @ (k, n)`` in float32 and int8 -> int32 (XLA's dot_general on this CPU)."""
    times = measure(_pair(m, k, n), repeats, min_sample_s=0.2)
    flops = 2.0 * m * k * n
    return {
        "shape": [m, k, n],
        "times": times,
        "gops": {c: flops / (times[c]["median_ms"] * 1e-3) / 1e9 for c in times},
        "int8 / float32": paired_ratio(times["int8"], times["float32"]),
    }


def machine_line(payload: dict) -> str:
    m = payload["machine"]
    isa = [f for f in ISA_SHOWN if f in m["cpu_isa"]]
    return (
        f"{m['cpu']}, {m['cpu_cores_available']} cores, {', '.join(isa)}; measured peaks "
        f"(2048^2): float32 {payload['matmul_peak']['flops'] / 1e9:.0f} GFLOP/s, int8 "
        f"{payload['int8_peak']['gops']['int8']:.0f} GOP/s"
    )


def rows(payload: dict) -> list[list]:
    out = []
    for r in payload["models"]:
        w = r["weight_bytes"]
        for i, c in enumerate(r["cases"]):
            t, s = c["times"], c["split"]
            out.append(
                [
                    f"{r['model']} {r['setup']}" if i == 0 else "",
                    f"{c['batch']} x {c['seq_len']}",
                    t["fp32"]["median_ms"],
                    t["fake quant"]["median_ms"],
                    t["int8"]["median_ms"],
                    c["ratios"]["int8 / fp32"],
                    c["ratios"]["int8 / fake quant"],
                    f"{s['fp32']['matmul_ms']:.0f} / {s['fp32']['other_ms']:.0f}",
                    f"{s['int8']['matmul_ms']:.0f} / {s['int8']['other_ms']:.0f}",
                    c["ffn_matmul"]["int8 / float32"],
                    f"{w['fp32'] / w['int8']:.2f}x" if i == 0 else "",
                ]
            )
    return out


HEADERS = [
    "model",
    "batch x seq",
    "fp32 ms",
    "fake quant ms",
    "int8 ms",
    "int8 / fp32",
    "int8 / fake",
    "fp32 matmul / other ms",
    "int8 matmul / other ms",
    "int8 / fp32 FFN dot",
    "weights smaller",
]


def readme_block(payload: dict) -> str:
    def cell(x):
        return (
            f"{x:.2f}"
            if isinstance(x, float) and x < 10
            else (f"{x:,.0f}" if isinstance(x, float) else str(x))
        )

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows(payload)]
    repeats = payload["args"]["repeats"]
    return (
        f"Machine: {machine_line(payload)}. Medians of {repeats} interleaved calls; "
        "matmul / other: XLA's per-op profile of one call (fusions that contain a dot count as "
        "matmul; the two cores overlap, so the sum can exceed the latency); FFN dot: "
        "tokens x 768 x 3072 alone, int8 time / float32 time.\n\n" + "\n".join(lines)
    )


def main():
    p = base_parser(__doc__, "int8")
    p.add_argument("--sizes", default=None, help="BATCHxSEQ list (default 1x128,8x128,8x512)")
    p.add_argument("--setup", default="W8A8")
    p.add_argument("--profile_calls", type=int, default=2, help="calls per op profile")
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    p.add_argument("--no_readme", action="store_true", help="write the JSON only")
    p.set_defaults(repeats=5)
    args = p.parse_args()
    if args.readme_only:
        with open(args.out) as f:
            return rewrite_readme("bench:int8", readme_block(json.load(f)))
    default = "1x128,8x128" if args.quick else "1x128,8x128,8x512"
    sizes = parse_sizes(args.sizes or default)
    run = Run("int8")
    names = ("opt-tiny", "bert-tiny") if args.quick else ("opt-125m", "bert-base")
    n = 1024 if args.quick else 2048
    peak = matmul_peak(n, jnp.float32, 5)
    int8_peak = bench_matmul(n, n, n, 5)
    payload = {"machine": run.machine, "matmul_peak": peak, "int8_peak": int8_peak}
    print(machine_line(payload) + f" | all ISA: {', '.join(cpu_isa())}")
    models = [bench_model(m, args.setup, sizes, args.repeats, args.profile_calls) for m in names]
    payload.update(args=vars(args), models=models)
    print(table(HEADERS, rows(payload)))
    run.finish(args.out, args=vars(args), matmul_peak=peak, int8_peak=int8_peak, models=models)
    if not args.quick and not args.no_readme and args.sizes is None:
        with open(args.out) as f:
            rewrite_readme("bench:int8", readme_block(json.load(f)))


if __name__ == "__main__":
    main()
