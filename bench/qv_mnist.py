"""Quantization Variation on a small ViT: MNIST test accuracy of 4/3/2-bit QAT, part by part.

Command (from the repository root, offline; needs ../shared/data/mnist or ``--local_dir``)::

    python bench/qv_mnist.py                      # FP training (cached), then 12 QAT runs
    python bench/qv_mnist.py --fp_steps 1200 --qat_steps 600     # the 10-minute version
    python bench/qv_mnist.py --bits W2A2 --methods lsq,qv_lsq+kd+obr --qat_steps 300

1. Trains ``configs/vit_s16_vanilla.py:tiny`` (ViT, 2 x 64, 16 patches of 7x7) in full
   precision on the first 7000 images of the local MNIST set (``--fp_steps`` x 64, lr 1e-3);
   the last 3000 (``config.data.holdout``) are the held-out test images. The FP workdir
   (``fp_<steps>``) is reused when it is there.
2. From that checkpoint, runs QAT (``--qat_steps`` x 64, AdamW lr 5e-4 cosine to 0, no
   warmup, weight decay 1e-4: the paper's recipe at this scale) at W4A4, W3A3 and W2A2 with:

   * ``lsq``: plain LSQ (preset ``lsq``: one step per tensor, LSQ gradient scale);
   * ``qv_lsq``: module-dependent LSQ (preset ``qv_lsq``);
   * ``qv_lsq+kd``: + distillation from the FP model (soft cross-entropy, no hard labels) over
     4 random-resized crops (scale 0.5-1) of each of 16 images per batch, as the paper;
   * ``qv_lsq+kd+obr``: + oscillation-aware bin regularization (lambda to 0.01 from 25 %).

   Every run tracks weight oscillation (momentum 0.001, threshold 0.005).
3. Prints test accuracy (%, with the binomial standard error) and the final oscillating
   fraction of the weights per cell, and writes ``bench/results/qv_mnist.json``::

    {"fp": acc, "test_images": n, "cells": {bits: {method: {"accuracy": acc,
     "stderr": se, "oscillating_fraction": f, "seconds": s}}}, "machine": {...}}
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # noqa: E402
from common import Run, base_parser, binomial_se, matmul_peak, table  # noqa: E402

from configs import common as configs  # noqa: E402

BITS = ("W4A4", "W3A3", "W2A2")
METHODS = ("lsq", "qv_lsq", "qv_lsq+kd", "qv_lsq+kd+obr")
HOLDOUT = 3000


def fp_config(args):
    """The FP run: ``vit_s16_vanilla.py:tiny`` on 7000 MNIST images, 3000 held out."""
    c = configs.vit_image("vanilla", "tiny")
    if args.local_dir:
        c.data.local_dir = args.local_dir
    c.data.update(holdout=HOLDOUT, eval_batch_size=500, max_eval_batches=None)
    c.train.update(
        steps=args.fp_steps,
        checkpoint_every=args.fp_steps,
        log_every=100,
        max_eval_batches=None,
        tensorboard=False,
    )
    return c


def qat_config(args, bits: str, method: str, fp_dir: str):
    """QAT of the FP checkpoint with ``method`` at ``bits`` (see the module docstring)."""
    c = fp_config(args)
    c.init_from = fp_dir
    c.quant = {"preset": "lsq" if method == "lsq" else "qv_lsq", "bits": bits, "mode": "learn"}
    c.optim.update(lr=5e-4, warmup_steps=0, weight_decay=1e-4, schedule="cosine")
    c.train.update(
        steps=args.qat_steps,
        checkpoint_every=args.qat_steps,
        calib_batches=1,
        track_oscillation=True,
    )
    if "kd" in method:  # the paper's distillation: soft CE over 4 random crops of each image
        c.train.update(distill=1.0, distill_loss="soft_ce", task_loss_weight=0.0)
        c.data.update(repeated_aug=4, crop_scale=(0.5, 1.0))
    if "obr" in method:
        c.train.update(obr=0.01, obr_start=0.25)
    return c


def main():
    p = base_parser(__doc__, "qv_mnist")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "qv_mnist"))
    p.add_argument("--fp_steps", type=int, default=6000, help="FP training steps at batch 64")
    p.add_argument("--qat_steps", type=int, default=2000, help="QAT steps per cell at batch 64")
    p.add_argument("--bits", default=",".join(BITS), help="comma-separated cells")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--local_dir", default=None, help="folder holding mnist/ (../shared/data)")
    args = p.parse_args()
    bits, methods = args.bits.split(","), args.methods.split(",")
    for given, allowed, flag in ((bits, BITS, "--bits"), (methods, METHODS, "--methods")):
        bad = sorted(set(given) - set(allowed))
        if bad:
            p.error(f"{flag} {bad} are invalid; allowed: {', '.join(allowed)}")
    from qtx.run.experiment import load
    from qtx.run.train import train

    fp_dir = os.path.join(args.workdir, f"fp_{args.fp_steps}")  # reused by later runs
    for b in bits:
        for m in methods:
            load(qat_config(args, b, m, fp_dir))  # every setting is checked before compute
    run = Run("qv_mnist")
    peak = matmul_peak(1024, jnp.float32, 3)
    t0 = time.perf_counter()
    train(fp_config(args), fp_dir)  # returns at once when the FP run is complete
    with open(os.path.join(fp_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fp_acc = [r for r in rows if r["split"] == "eval" and r["step"] == args.fp_steps][-1]
    fp_acc = fp_acc["accuracy"]
    t_fp = time.perf_counter() - t0

    cells: dict = {}
    for b in bits:
        for m in methods:
            workdir = os.path.join(args.workdir, f"{b}_{m}")
            shutil.rmtree(workdir, ignore_errors=True)
            t0 = time.perf_counter()
            out = train(qat_config(args, b, m, fp_dir), workdir)
            acc = out["eval"]["accuracy"]
            cells.setdefault(b, {})[m] = {
                "accuracy": 100 * acc,
                "stderr": binomial_se(acc, HOLDOUT),
                "oscillating_fraction": out["train"]["oscillating"],
                "seconds": time.perf_counter() - t0,
            }
            print(f"{b} {m}: {100 * acc:.2f} % (oscillating {out['train']['oscillating']:.4f})")

    rows = [
        [b]
        + [f"{cells[b][m]['accuracy']:.2f} ± {cells[b][m]['stderr']:.2f}" for m in methods]
        + [f"{100 * fp_acc:.2f}"]
        for b in bits
    ]
    print(f"\nMNIST test accuracy (%, {HOLDOUT} held-out images, ± binomial standard error)")
    print(table(["bits", *methods, "FP"], rows))
    rows = [[b] + [f"{cells[b][m]['oscillating_fraction']:.4f}" for m in methods] for b in bits]
    print("\noscillating fraction of the weights at the end of QAT")
    print(table(["bits", *methods], rows))
    run.finish(
        args.out,
        fp=100 * fp_acc,
        fp_stderr=binomial_se(fp_acc, HOLDOUT),
        test_images=HOLDOUT,
        cells=cells,
        fp_steps=args.fp_steps,
        qat_steps=args.qat_steps,
        fp_seconds=t_fp,
        matmul_peak_float32=peak,
    )


if __name__ == "__main__":
    main()
