"""The LLM PTQ methods on the tiny LLaMA: WikiText-2 perplexity at W4A4, W4A8 and W4A16.

Command (from the repository root, offline, a few minutes on 2 cores)::

    python bench/ptq_decoder.py
    python bench/ptq_decoder.py --config configs/llama_gated.py:tiny --methods minmax,rotation

1. Trains ``configs/llama_ptq.py:tiny`` (the tiny decoder of ``configs/llama_vanilla.py:tiny``:
   2 x 128, GQA, RMSNorm, SwiGLU, on the embedded WikiText-2 sample) for ``--steps`` (1000,
   five times the config's 200, so that the model is past its first plateau); the
   checkpoint in ``--workdir`` is reused when it is there.
2. Runs ``eval.py``'s PTQ (``qtx.run.evaluate.evaluate``) with the config's calibration
   batches for the cells ``W8A8`` (``w8a8_dynamic``: per-channel 8-bit kernels, per-token
   dynamic 8-bit activations), ``W4A4`` (``w4a8:W4A4``: 4-bit kernels per group of 128
   inputs, 4-bit per-token dynamic activations at every linear input and q / k / v /
   probabilities), ``W4A8`` (``w4a8``) and ``W4A16`` (``w4a16``, weight-only) and the
   methods round-to-nearest (``minmax``), GPTQ, the Hadamard rotation, rotation + GPTQ
   (QuaRot's recipe) and SmoothQuant (alpha 0.85).
3. Prints perplexity per cell with FP beside it and writes ``bench/results/ptq_decoder.json``::

    {"fp": ppl, "cells": {"W8A8" | "W4A4" | "W4A8" | "W4A16": {method: ppl}},
     "calibration_seconds": {cell: {method: s}}, "machine": {...}}
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    Run,
    base_parser,
    get_config,
    machine_summary,
    matmul_peak,
    rewrite_readme,
    table,
)

CELLS = {"W8A8": "w8a8_dynamic", "W4A4": "w4a8:W4A4", "W4A8": "w4a8", "W4A16": "w4a16"}
METHODS = ("minmax", "gptq", "rotation", "rotation+gptq", "smoothquant")


def readme_block(r: dict) -> str:
    """The README's table of ``bench/results/ptq_decoder.json``."""
    cells = list(r["cells"])
    methods = list(dict.fromkeys(m for c in cells for m in r["cells"][c]))
    rows = ["| method | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    for m in methods:
        ppl = [f"{r['cells'][c][m]:.2f}" if m in r["cells"][c] else "" for c in cells]
        rows.append(f"| `{m}` | " + " | ".join(ppl) + " |")
    return (
        f"WikiText-2 perplexity of `{r['config']}` trained {r['train']['steps']} steps (FP "
        f"{r['fp']:.2f}; `bench/ptq_decoder.py`, "
        f"{r['machine_line']}, {r['ptq_seconds'] / 60:.0f} min of PTQ):\n\n"
        + "\n".join(rows)
        + "\n\n"
        + expectations(r)
    )


# the papers' expectations: (cell, method, baseline), lower perplexity is better
EXPECTED = (
    ("W4A4", "rotation", "minmax"),
    ("W4A4", "rotation+gptq", "minmax"),
    ("W4A4", "rotation+gptq", "rotation"),
    ("W4A16", "gptq", "minmax"),
    ("W8A8", "smoothquant", "minmax"),
)


def expectations(r: dict) -> str:
    """One generated line per expectation of the papers: the perplexity difference."""
    out = []
    for cell, method, base in EXPECTED:
        ppl = r["cells"].get(cell, {})
        if method in ppl and base in ppl:
            out.append(f"`{method}` {ppl[method] - ppl[base]:+.2f} vs `{base}` ({cell})")
    return "Perplexity differences the papers predict negative: " + "; ".join(out) + "."


def main():
    p = base_parser(__doc__, "ptq_decoder")
    p.add_argument("--config", default="configs/llama_ptq.py:tiny")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ptq_decoder"))
    p.add_argument("--steps", type=int, default=1000, help="training steps at batch 16")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    args = p.parse_args()
    if args.readme_only:
        with open(args.out) as f:
            return rewrite_readme("bench:ptq_decoder", readme_block(json.load(f)))
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"--cells {unknown} are invalid; allowed: {', '.join(CELLS)}")
    from qtx.run.evaluate import evaluate
    from qtx.run.experiment import load
    from qtx.run.train import train

    c = get_config(args.config)
    c.eval.update(setups=tuple(CELLS[x] for x in cells), ptq_methods=tuple(args.methods.split(",")))
    c.train.update(steps=args.steps, checkpoint_every=args.steps, tensorboard=False)
    load(c)  # every setting is checked before any compute
    run = Run("ptq_decoder")
    peak = matmul_peak(1024, jnp.float32, 3)
    t0 = time.perf_counter()
    trained = train(c, args.workdir)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(c, args.workdir)
    t_ptq = time.perf_counter() - t0

    fp = res["fp"]["perplexity"]
    cell = {v: k for k, v in CELLS.items()}
    ppl, secs = {}, {}
    for name, r in res["quantized"].items():
        setup, _, method = name.partition("/")
        ppl.setdefault(cell[setup], {})[method] = r["perplexity"]
        secs.setdefault(cell[setup], {})[method] = r["calibration_seconds"]
    methods = args.methods.split(",")
    rows = [[m] + [f"{ppl[x][m]:.2f}" for x in ppl] for m in methods]
    print(f"\nWikiText-2 perplexity, {args.config} (FP {fp:.2f})")
    print(table(["method", *ppl], rows))
    payload = dict(
        config=args.config,
        fp=fp,
        cells=ppl,
        calibration_seconds=secs,
        train={"steps": args.steps, "seconds": t_train, "cached": "train" not in trained},
        ptq_seconds=t_ptq,
        matmul_peak_float32=peak,
        machine_line=machine_summary(peak["flops"] / 1e9),
    )
    run.finish(args.out, **payload)
    if args.cells == ",".join(CELLS) and args.methods == ",".join(METHODS):
        rewrite_readme("bench:ptq_decoder", readme_block(payload))


if __name__ == "__main__":
    main()
