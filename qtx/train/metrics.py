"""Metric writers: a JSONL file, TensorBoard and a console progress line (process 0 only).

``<workdir>/metrics.jsonl`` holds one JSON object per line: ``{"step", "split", ...}``. On
resume, lines past the restored step are dropped so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


def _scalar(v):
    v = float(jax.device_get(v))
    return v if math.isfinite(v) else str(v)


class MetricWriter:
    def __init__(
        self, workdir: str, total_steps: int, resume_step: int = 0, tensorboard: bool = True
    ):
        self.enabled = jax.process_index() == 0
        self.total = total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._last = (time.perf_counter(), resume_step)
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:  # a line cut short by a killed process is dropped
                    if json.loads(line)["step"] <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        row = {"step": int(step), "split": split, **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, float):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        return row

    def progress(self, step: int, row: dict, units: float, unit_name: str) -> None:
        """Prints ``step s/total | loss | lr | <units>/s`` since the previous call."""
        if not self.enabled:
            return
        now = time.perf_counter()
        t0, s0 = self._last
        rate = units * (step - s0) / max(now - t0, 1e-9)
        self._last = (now, step)
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        parts = [f"[{bar}] {step}/{self.total}"]
        for k in ("loss", "lr", "grad_norm"):
            if k in row:
                parts.append(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}")
        parts.append(f"{rate:,.0f} {unit_name}/s")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
