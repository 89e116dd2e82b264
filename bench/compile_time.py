"""Compile time of the first train step against depth, with and without scanned layers.

Command (from the repository root)::

    python bench/compile_time.py            # opt-125m (12 layers) and opt-1.3b (24 layers)
    python bench/compile_time.py --quick    # opt-125m and opt-350m, remat off

For each model (``configs/opt125m_gated.py`` and ``configs/opt1_3b_gated.py``, float32, one
sequence of ``--seq_len`` tokens, the config's optimizer) and ``scan_layers`` off / on (both
with the config's remat), the jitted train step (``make_train_step``, ``donate_argnums=(0,)``)
is traced, lowered and compiled from abstract shapes (``jax.eval_shape``: no weights are
allocated, so opt-1.3b fits any machine); ``trace+lower`` and ``compile`` seconds are the
median of ``--repeats`` runs with the compilation cache off. Printed: model | layers |
scan | trace+lower s | compile s | total s, then per setting the ratio of the deeper
model's total to opt-125m's. The JSON (``bench/results/compile_time.json``) has every
sample and the machine.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from common import Run, base_parser, get_config, table

from qtx.models import build
from qtx.run.experiment import load as load_experiment
from qtx.train.optim import make_optimizer
from qtx.train.steps import create_state, make_train_step


def compile_seconds(spec: str, scan: bool, seq_len: int, remat: bool | None) -> dict:
    """Seconds to trace+lower and to compile the train step of ``spec`` (abstract inputs)."""
    config = get_config(spec)
    config.model.dtype = "float32"
    config.model.scan_layers = scan
    if remat is not None:
        config.model.remat = remat
    config.optim.grad_accum = 1
    config.data.batch_size, config.data.seq_len = 1, seq_len
    exp = load_experiment(config)
    cfg = exp.model
    model = build(cfg, exp.plan)
    tx, schedule = make_optimizer(exp.optim, int(exp.train["steps"]))
    ids = jnp.zeros((1, seq_len), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids}

    def init_state():
        v = model.init(jax.random.key(0), input_ids=ids, attention_mask=ids)
        params = v.pop("params")
        return create_state(params, tx, v)

    state = jax.eval_shape(init_state)
    step = make_train_step(model, cfg.family, exp.task, tx, schedule, jax.random.key(1))
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "layers": cfg.num_layers}


def main():
    p = base_parser(__doc__, "compile_time")
    p.add_argument("--seq_len", type=int, default=256, help="tokens of the one sequence")
    p.add_argument("--repeats_compile", type=int, default=None, help="(alias of --repeats)")
    args = p.parse_args()
    repeats = args.repeats_compile or min(args.repeats, 3)
    jax.config.update("jax_enable_compilation_cache", False)
    run = Run("compile_time")
    small = "configs/opt125m_gated.py"
    big = "configs/opt350m_gated.py" if args.quick else "configs/opt1_3b_gated.py"
    remat = False if args.quick else None
    results, rows = {}, []
    for scan in (False, True):
        for spec in (small, big):
            samples = [compile_seconds(spec, scan, args.seq_len, remat) for _ in range(repeats)]
            r = {
                "layers": samples[0]["layers"],
                "scan_layers": scan,
                "lower_s": statistics.median(s["lower_s"] for s in samples),
                "compile_s": statistics.median(s["compile_s"] for s in samples),
                "samples": samples,
            }
            r["total_s"] = r["lower_s"] + r["compile_s"]
            results[f"{spec} scan={scan}"] = r
            rows.append([spec, r["layers"], scan, r["lower_s"], r["compile_s"], r["total_s"]])
            print(f"{spec} scan={scan}: {r['total_s']:.1f} s", flush=True)
    ratios = []
    for scan in (False, True):
        a, b = results[f"{big} scan={scan}"], results[f"{small} scan={scan}"]
        ratios.append([f"scan_layers={scan}", a["total_s"] / b["total_s"]])
    print()
    print(table(["config", "layers", "scan", "trace+lower s", "compile s", "total s"], rows))
    print()
    print(table(["setting", f"{big} / {small} total"], ratios))
    run.finish(
        args.out,
        settings=vars(args),
        results=results,
        ratios={k: v for k, v in ratios},
    )


if __name__ == "__main__":
    main()
