"""eval.py's driver: FP metrics and outlier statistics, then every quantized setup.

Writes ``<workdir>/eval.json``::

    {"step": int,
     "fp": {"perplexity" | "accuracy": x, "max_inf_norm": x, "avg_kurtosis": x,
            "headline_inf_norm": x, "per_layer": {tensor: {"inf_norm", "kurtosis"}},
            "decoder_outliers": {...}},  # causal decoders (qtx.evaluate.decoder_outliers)
     "quantized": {"W8A8": {"perplexity" | "accuracy": x, "setup": str, "method": str | None,
                            "calibration_seconds": s, "details": {...}, "points": {...}},
                   ...}}

(with ``config.eval.ptq_methods`` the names are ``<setup>/<method>``; with
``config.eval.integer`` every quantized entry also has ``"integer": {metric, "max_logit_diff",
"weight_bytes", "float_weight_bytes", "integer_matmuls", "float_matmuls"}``, its integer
model's), prints the same as a table, and draws ``outliers.png``, ``decoder_outliers.png``
(causal decoders) and ``attention_mass.png``. With ``config.eval.variation`` it also writes
``variation.json`` and ``variation.png`` (see ``qtx.methods.quant_variation.analysis``).
"""

from __future__ import annotations

import json
import math
import os

import jax

from qtx import hf, quant
from qtx.errors import UserError
from qtx.evaluate import figures
from qtx.evaluate.integer import evaluate_integer
from qtx.evaluate.metrics import glue_task_of, headline_metric, make_evaluate, scores
from qtx.evaluate.outliers import OutlierAccumulator
from qtx.methods import registry as methods
from qtx.methods.quant_variation import COLLECTION, analysis
from qtx.models import build, dummy_inputs
from qtx.models.family import family_record
from qtx.nn import ATTENTION
from qtx.run.experiment import check_workdir
from qtx.run.prepare import prepare, say
from qtx.run.ptq import evaluate_setup
from qtx.train.checkpoint import Checkpointer
from qtx.train.losses import model_inputs
from qtx.train.mesh import (
    fetch,
    global_batch,
    tree_shardings,
)


def load_variables(exp, workdir: str, hf_checkpoint: str | None, mesh):
    """``(step, params, extra)`` from an HF checkpoint or the workdir's latest checkpoint,
    parameters sharded over ``mesh``."""
    cfg = exp.model
    if hf_checkpoint:
        params = hf.pretrained_params(hf_checkpoint, cfg)
        # HF checkpoints hold the original model (e.g. its LayerNorms' gammas)
        for rep in methods.applied_reparametrisations(cfg):
            params = rep.params_for(cfg, params)
        return 0, jax.device_put(params, tree_shardings(mesh, jax.eval_shape(lambda: params))), {}
    ck = Checkpointer(workdir, async_save=False)
    model = build(cfg, exp.plan.with_mode("off"))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(cfg)))
    if exp.plan.needs_calibration:  # trained with quantizers: their params are in the tree
        abstract = jax.eval_shape(
            lambda: build(cfg, exp.plan).init(jax.random.key(0), **dummy_inputs(cfg))
        )
    restored = ck.restore_newest(
        abstract["params"],
        lambda a: tree_shardings(mesh, a),
        extra=exp.plan.needs_calibration,
    )
    ck.close()
    if restored is None:
        raise UserError(
            f"no checkpoint in {ck.directory}; train first with the same --workdir, "
            "or pass --hf_checkpoint=<local Hugging Face directory>."
        )
    return restored.step, restored.tree, restored.extra


def evaluate(config, workdir: str, hf_checkpoint: str | None = None) -> dict:
    exp, mesh, pipe = prepare(config)
    check_workdir(workdir)  # eval.json and the figures go there
    ev, task = exp.eval, exp.task
    cfg = exp.model.replace(dtype=ev["dtype"]) if ev["dtype"] else exp.model
    step, params, extra = load_variables(exp, workdir, hf_checkpoint, mesh)
    to_dev = lambda b: global_batch(mesh, b)  # noqa: E731
    glue = glue_task_of(exp)
    metric = headline_metric(task, glue)

    def run(model, variables, outliers=None):
        batches = lambda: pipe.eval_batches(ev["max_batches"])  # noqa: E731
        evaluate = make_evaluate(model, cfg.family, task, batches, to_dev, glue, bool(outliers))
        return evaluate(variables, outliers)

    fp_plan = quant.QuantPlan(track=exp.plan.track)
    fp_model = build(cfg, fp_plan)
    acc = OutlierAccumulator(cfg.family)
    fp = run(fp_model, {"params": params}, acc)
    out = acc.summary()
    results = {
        "step": int(step),
        "fp": {metric: fp[metric], **scores(fp), "loss": fp["loss"], **out},
        "quantized": {},
    }
    say(
        f"FP: {metric} {fp[metric]:.4g}, max inf norm {out['max_inf_norm']:.4g}, "
        f"avg kurtosis {out['avg_kurtosis']:.4g}"
    )
    if out.get("decoder_outliers"):
        say(f"FP {decoder_line(out['decoder_outliers'])}")

    def integer(name, cell_cfg, plan, variables):
        """The cell's integer model (eval.integer), printed under the cell's own line."""
        if not ev["integer"]:
            return {}
        batches = pipe.eval_batches(ev["max_batches"])
        r = evaluate_integer(cell_cfg, plan, variables, run, batches, to_dev, metric)
        say(
            f"{name} int8: {metric} {r[metric]:.4g}, max logit diff to fake quant "
            f"{r['max_logit_diff']:.3g}"
        )
        return {"integer": r}

    if exp.plan.needs_calibration and extra:
        trained = build(cfg, exp.plan.with_mode("quantize"))
        r = run(trained, {"params": params, **extra})
        results["quantized"]["trained"] = {metric: r[metric], **scores(r), "loss": r["loss"]}
        say(f"trained: {metric} {r[metric]:.4g} (the run's own quantizers)")
        results["quantized"]["trained"].update(
            integer("trained", cfg, exp.plan, {"params": params, **extra})
        )
    calib = [
        to_dev(b) for b in pipe.calib_batches(int(ev["calib_batches"]), int(ev["calib_batch_size"]))
    ]
    host_params = fetch(params)
    for name, setup, method in exp.eval_cells():
        kept = []
        r, report, seconds, info = evaluate_setup(
            cfg,
            setup,
            host_params,
            calib,
            run,
            ev["options"],
            ev["calibration"],
            method,
            ev["ptq_options"],
            metric,
            kept,
        )
        results["quantized"][name] = {
            metric: r[metric],
            **scores(r),
            "loss": r["loss"],
            "setup": setup,
            "method": method,
            "calibration_seconds": seconds,
            **({"details": info} if info else {}),
            "points": {
                "quantized": len(report.quantized),
                "total": len(report.matched),
                "unmatched": report.unmatched_points,
                "unused_rules": report.unused_rules,
            },
        }
        say(
            f"{name}: {metric} {r[metric]:.4g} ({len(report.quantized)} of "
            f"{len(report.matched)} points quantized, calibration {seconds:.1f} s)"
        )
        results["quantized"][name].update(integer(name, *kept[0]))

    if ev["variation"]:
        results["variation"] = variation_analysis(
            cfg, host_params, calib, run, extra, ev, workdir, step
        )
    if ev["figures"]:  # every process joins the attention pass; process 0 draws
        results["figures"] = draw_figures(fp_model, params, pipe, out, workdir, cfg, to_dev, step)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(format_table(results, metric, workdir, hf_checkpoint), flush=True)
    return results


def variation_analysis(cfg, params, calib, run, extra, ev, workdir, step=None) -> dict:
    """Quantization Variation's analysis -> ``variation.json`` and ``variation.png`` (titled
    with the run of ``workdir`` and ``step``)."""
    tracker = (extra or {}).get(COLLECTION)
    result = analysis.analyse(
        cfg,
        params,
        calib,
        run,
        bits=int(ev["variation_bits"]),
        heads=bool(ev["variation_heads"]),
        oscillation=fetch(tracker) if tracker else None,
        log=say,
    )
    paths = {"json": os.path.join(workdir, "variation.json")}
    paths["png"] = os.path.join(workdir, "variation.png")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(paths["json"], "w") as f:
            json.dump(result, f, indent=1)
        what = f"quantization variation at {result['bits']} bits"
        analysis.plot(result, paths["png"], figures.run_title(what, workdir, step, cfg.family))
    modules = [(v, f"{b}/{m}") for b, row in result["modules"].items() for m, v in row.items()]
    return {**paths, "most_sensitive": [name for _, name in sorted(modules, reverse=True)[:5]]}


def draw_figures(
    model, params, pipe, outlier_summary, workdir, cfg, to_dev, step=None
) -> list[str]:
    """``outliers.png``, ``decoder_outliers.png`` (causal decoders) and ``attention_mass.png``
    (first eval batch; not for a family without class or special tokens, e.g. Swin) in
    ``workdir``, titled with its run and ``step``."""
    paths = [os.path.join(workdir, "outliers.png")]
    run = {"workdir": workdir, "step": step, "family": cfg.family}
    if outlier_summary.get("decoder_outliers"):  # causal decoders
        paths.append(os.path.join(workdir, "decoder_outliers.png"))
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            figures.plot_decoder_outliers(outlier_summary["decoder_outliers"], paths[-1], **run)
    if not family_record(cfg.family).noop_tokens:
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            figures.plot_outliers(outlier_summary["per_layer"], paths[0], **run)
        return paths
    paths.append(os.path.join(workdir, "attention_mass.png"))
    dev = to_dev(next(iter(pipe.eval_batches(1))))
    _, coll = jax.jit(
        lambda v, b: model.apply(v, **model_inputs(cfg.family, b), mutable=[ATTENTION])
    )({"params": params}, dev)
    probs, batch = fetch(coll[ATTENTION]), fetch(dev)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        figures.plot_outliers(outlier_summary["per_layer"], paths[0], **run)
        mass = figures.attention_mass(probs, batch, pipe.special_token_ids, cfg.family)
        figures.plot_attention_mass(mass, paths[-1], "attention on special tokens", **run)
    return paths


def written_files(results: dict) -> list[str]:
    """The names of the files :func:`evaluate` writes with ``results``: ``eval.json``, then
    the figures and the variation analysis where ``results`` has them."""
    variation = results.get("variation") or {}
    paths = [
        *results.get("figures", ()),
        *(variation[k] for k in ("json", "png") if k in variation),
    ]
    return ["eval.json", *(os.path.basename(p) for p in paths)]


def table_header(results: dict, workdir: str | None = None, hf_checkpoint: str | None = None):
    """Which checkpoint was evaluated and which files were written where."""
    names = ", ".join(written_files(results))
    if hf_checkpoint:
        there = f" ({names} written to {workdir})" if workdir else ""
        return f"eval of Hugging Face checkpoint {hf_checkpoint}{there}"
    if workdir is None:
        return f"eval at step {results['step']}"
    return f"eval of {workdir} at step {results['step']} ({names} written there)"


def format_table(
    results: dict, metric: str, workdir: str | None = None, hf_checkpoint: str | None = None
) -> str:
    """``evaluate``'s ``results`` as a header line (see :func:`table_header`) and a table: FP,
    then every quantized entry, each directly followed by its integer model's row."""

    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) and math.isfinite(x) else str(x)

    fp = results["fp"]
    rows = [
        ("setup", metric, "max inf norm", "avg kurtosis", "calibration s"),
        ("FP", fmt(fp[metric]), fmt(fp["max_inf_norm"]), fmt(fp["avg_kurtosis"]), ""),
    ]
    for k, v in results["quantized"].items():
        secs = v.get("calibration_seconds")
        rows.append((k, fmt(v[metric]), "", "", "" if secs is None else f"{secs:.1f}"))
        if "integer" in v:
            rows.append((f"{k} int8", fmt(v["integer"][metric]), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if fp.get("decoder_outliers"):
        lines.append(f"FP {decoder_line(fp['decoder_outliers'])}")
    return "\n".join([table_header(results, workdir, hf_checkpoint), *lines])


def decoder_line(d: dict) -> str:
    """One line of a decoder's ``decoder_outliers`` (qtx.evaluate.decoder_outliers)."""
    return (
        f"decoder outliers: max |x| {d['max_activation']:.4g} (layer "
        f"{d['max_activation_layer']}, position {d['max_activation_position']}, channel "
        f"{d['max_activation_channel']}), median sequence max {d['massive_activation']:.4g} "
        f"(layer {d['massive_activation_layer']}), first-token attention mass "
        f"{d['first_token_mass']:.3f}"
    )
