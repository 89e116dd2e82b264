"""``eval.py --int8=DIR``: an integer model written by ``export.py --int8`` beside its
fake-quant twin, on the config's eval data."""

from __future__ import annotations

import json
import os

import jax

from qtx.evaluate.integer import check_same_model, fake_twin, load, max_output_difference
from qtx.evaluate.metrics import glue_task_of, headline_metric, make_evaluate, scores
from qtx.models import build
from qtx.quant.convert import weight_bytes
from qtx.run.prepare import prepare, say
from qtx.train.mesh import global_batch


def evaluate_directory(config, path: str) -> dict:
    """``eval.py --int8=DIR``: the integer model of an int8 directory and its fake-quant twin
    on the config's eval data; writes ``DIR/eval.json`` and prints a table."""
    exp, mesh, pipe = prepare(config)
    cfg, iplan, int_vars, meta = load(path)
    check_same_model(cfg, exp.model, path)
    ev = exp.eval
    cfg = cfg.replace(dtype=ev["dtype"]) if ev["dtype"] else cfg
    glue = glue_task_of(exp)
    metric = headline_metric(exp.task, glue)
    to_dev = lambda b: global_batch(mesh, b)  # noqa: E731

    def run(model):
        batches = lambda: pipe.eval_batches(ev["max_batches"])  # noqa: E731
        return make_evaluate(model, cfg.family, exp.task, batches, to_dev, glue)(int_vars)

    int_model, twin = build(cfg, iplan), build(cfg, fake_twin(iplan))
    r_int, r_fq = run(int_model), run(twin)
    batches = pipe.eval_batches(ev["max_batches"])
    diff = max_output_difference(cfg, twin, int_vars, int_model, int_vars, batches, to_dev)
    report = meta["report"]
    results = {
        "int8": path,
        "source": meta.get("source", {}),
        "fake_quant": {metric: r_fq[metric], **scores(r_fq), "loss": r_fq["loss"]},
        "integer": {metric: r_int[metric], **scores(r_int), "loss": r_int["loss"]},
        "max_logit_diff": diff,
        "weight_bytes": weight_bytes(int_vars),
        "float_weight_bytes": report["float_weight_bytes"],
        "integer_matmuls": len(report["integer_matmuls"]),
        "float_matmuls": report["float_matmuls"],
    }
    if jax.process_index() == 0:
        with open(os.path.join(path, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        ratio = results["float_weight_bytes"] / max(results["weight_bytes"], 1)
        say(
            f"{path}: fake quant {metric} {r_fq[metric]:.4g} | integer {metric} "
            f"{r_int[metric]:.4g} | max logit diff {diff:.3g} | weights "
            f"{results['weight_bytes'] / 2**20:.2f} MiB ({ratio:.2f}x smaller than float32) | "
            f"{results['integer_matmuls']} integer matmuls, {len(results['float_matmuls'])} "
            "in float"
        )
    return results
