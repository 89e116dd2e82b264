"""Integer (int8) inference against float32 and fake quant: forward latency and weight memory.

Command (from the repository root)::

    python bench/int8.py                 # opt-125m and bert-base, W8A8, batch 1 x 128 tokens
    python bench/int8.py --quick         # opt-tiny and bert-tiny
    python bench/int8.py --batch 8 --seq 256 --repeats 11 --out /tmp/int8.json

For each model (random weights: the speed and size do not depend on their values), the W8A8
setup is calibrated on two random batches and converted (``qtx.evaluate.integer``). Three
jitted forwards run on the same tokens, timed interleaved (``bench/common.py``):

* ``fp32``: the float model;
* ``fake quant``: W8A8 fake quant (what eval.py evaluates);
* ``int8``: the integer model: int8 weights, every quantized matmul an int8 x int8 -> int32
  ``dot_general`` with one rescale.

Reported: median latency per case and the paired ratios (int8 / fp32, int8 / fake quant,
fake quant / fp32), the weight bytes of each (fake quant stores float weights; int8 stores
int8 codes plus the float embeddings, LayerNorms and biases), and one matmul of the FFN
shape (tokens x 768 x 3072) in float32 and int8 alone, which shows what XLA's integer dot
costs on this CPU. The CPU model, its instruction sets and the measured float32 matmul peak
are printed and stored with the JSON (``bench/results/int8.json``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import (  # noqa: E402
    Run,
    base_parser,
    blocking,
    matmul_peak,
    measure,
    paired_ratio,
    table,
)
from qtx import quant  # noqa: E402
from qtx.evaluate.integer import to_integer  # noqa: E402
from qtx.evaluate.ptq import calibrate_setup  # noqa: E402
from qtx.models import build, dummy_inputs, model_config  # noqa: E402
from qtx.quant.convert import tree_bytes  # noqa: E402


def tokens(cfg, batch: int, seq: int, seed: int):
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 4, cfg.vocab_size)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def bench_model(name: str, setup: str, batch: int, seq: int, repeats: int) -> dict:
    cfg = model_config(name, {"dropout": 0.0, "attention_dropout": 0.0})
    params = jax.jit(build(cfg).init)(jax.random.key(0), **dummy_inputs(cfg))["params"]
    plan = quant.QuantPlan(quant.setup_rules(setup), mode="quantize")
    calib = [tokens(cfg, batch, seq, s) for s in (1, 2)]
    variables = calibrate_setup(cfg, plan, params, calib)
    iplan, int_vars, report = to_integer(cfg, plan, variables)
    x = tokens(cfg, batch, seq, 3)

    def forward(model):
        return jax.jit(lambda v, inputs: model.apply(v, **inputs)["logits"])

    cases = {
        "fp32": blocking(forward(build(cfg)), {"params": params}, x),
        "fake quant": blocking(forward(build(cfg, plan)), variables, x),
        "int8": blocking(forward(build(cfg, iplan)), int_vars, x),
    }
    times = measure(cases, repeats)
    return {
        "model": name,
        "setup": setup,
        "batch": batch,
        "seq_len": seq,
        "times": times,
        "ratios": {
            "int8 / fp32": paired_ratio(times["int8"], times["fp32"]),
            "int8 / fake quant": paired_ratio(times["int8"], times["fake quant"]),
            "fake quant / fp32": paired_ratio(times["fake quant"], times["fp32"]),
        },
        "weight_bytes": {
            "fp32": tree_bytes(params),
            "fake quant": tree_bytes(variables),
            "int8": report.weight_bytes,
        },
        "integer_matmuls": len(report.integer_matmuls),
        "float_matmuls": report.float_matmuls,
    }


def bench_matmul(m: int, k: int, n: int, repeats: int) -> dict:
    """``(m, k) @ (k, n)`` in float32 and int8 -> int32 (XLA's dot_general on this CPU)."""
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (m, k))
    b = jax.random.normal(keys[1], (k, n))
    a8, b8 = (jnp.clip(jnp.round(t * 30), -128, 127).astype(jnp.int8) for t in (a, b))
    f32 = jax.jit(lambda x, y: x @ y)
    i8 = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32))
    times = measure({"float32": blocking(f32, a, b), "int8": blocking(i8, a8, b8)}, repeats)
    flops = 2.0 * m * k * n
    return {
        "shape": [m, k, n],
        "times": times,
        "gops": {c: flops / (times[c]["median_ms"] * 1e-3) / 1e9 for c in times},
        "int8 / float32": paired_ratio(times["int8"], times["float32"]),
    }


def main():
    p = base_parser(__doc__, "int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--setup", default="W8A8")
    args = p.parse_args()
    run = Run("int8")
    names = ("opt-tiny", "bert-tiny") if args.quick else ("opt-125m", "bert-base")
    peak = matmul_peak(1024 if args.quick else 2048, jnp.float32, 5)
    m = run.machine
    print(
        f"{m['cpu']} | {', '.join(m['cpu_isa'])} | float32 matmul peak "
        f"{peak['flops'] / 1e9:.0f} GFLOP/s | {m['cpu_cores_available']} cores"
    )
    models = [bench_model(n, args.setup, args.batch, args.seq, args.repeats) for n in names]
    mm = bench_matmul(args.batch * args.seq, 768, 3072, args.repeats)
    rows = []
    for r in models:
        t, w = r["times"], r["weight_bytes"]
        rows.append(
            [
                f"{r['model']} {r['setup']} {r['batch']}x{r['seq_len']}",
                t["fp32"]["median_ms"],
                t["fake quant"]["median_ms"],
                t["int8"]["median_ms"],
                r["ratios"]["int8 / fp32"],
                r["ratios"]["int8 / fake quant"],
                w["fp32"] / 2**20,
                w["int8"] / 2**20,
                w["fp32"] / w["int8"],
            ]
        )
    print(
        table(
            [
                "model",
                "fp32 ms",
                "fake quant ms",
                "int8 ms",
                "int8/fp32",
                "int8/fake",
                "fp32 MiB",
                "int8 MiB",
                "memory ratio",
            ],
            rows,
        )
    )
    print(
        f"matmul {mm['shape']}: float32 {mm['gops']['float32']:.0f} GFLOP/s, int8 "
        f"{mm['gops']['int8']:.0f} GOP/s (int8 / float32 time {mm['int8 / float32']:.2f})"
    )
    run.finish(args.out, args=vars(args), matmul_peak=peak, models=models, matmul=mm)


if __name__ == "__main__":
    main()
