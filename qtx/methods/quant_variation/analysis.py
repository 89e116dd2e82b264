"""Variation analysis (Quantization Variation §3): how differently modules and heads react to
quantization, where the outliers are, and which weights oscillate.

For a trained model and calibration batches:

* **module sensitivity**: every block's modules (``attn_input``: the attention LN output;
  ``q``/``k``/``v``: projection weight and output; ``softmax``; ``proj``: output projection and
  its input; ``fc1``: weight and FFN input; ``fc2``: weight and GELU output) are put, one at a
  time, at ``bits`` while every other of these points stays at 8 bits; the sensitivity is the
  change of the evaluation loss against all-8-bit: ``delta = L(module at b) - L(all at 8)``;
* **head sensitivity**: the same with one head's slices of the q, k, v (columns) and output
  projection (rows) weights at ``bits``, the rest of those weights at 8 bits;
* **outliers**: the FP model's mean per-sequence kurtosis and inf norm of every module input;
* **oscillation**: the oscillating fraction per quantized weight, from a QAT run's tracker.

Quantizers are per tensor, ranges by an MSE grid search (weights symmetric, activations
symmetric, the softmax unsigned, the GELU output asymmetric), calibrated on the batches given
in ``parallel`` mode (every range from the full-precision model), so the model is calibrated
twice (all points at 8 bits, all at ``bits``) and every configuration takes its ranges from
those two. Embeddings, the patch embedding and the classifier stay in full precision.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.evaluate.outliers import OutlierAccumulator
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.quant_variation.oscillation import oscillating_fractions
from qtx.models import ModelConfig, build
from qtx.quant import rule

# module -> point suffixes inside a block
MODULES = {
    "attn_input": ("attn_ln/out",),
    "q": ("attn/q_proj/weight", "attn/q"),
    "k": ("attn/k_proj/weight", "attn/k"),
    "v": ("attn/v_proj/weight", "attn/v"),
    "softmax": ("attn/softmax",),
    "proj": ("attn/o_proj/weight", "attn/context"),
    "fc1": ("ffn/fc1/weight", "ffn_ln/out"),
    "fc2": ("ffn/fc2/weight", "ffn/act"),
}
ACT_SCHEMES = {"attn/softmax": "unsigned", "ffn/act": "asymmetric"}
_WEIGHTS = r"attn/(q|k|v|o|qkv)_proj/weight$|ffn/fc[12]/weight$|merge/reduction/weight$"
_ACTS = r"(attn_ln/out|attn/(q|k|v|context|softmax)|ffn_ln/out|ffn/act|merge/ln/out)$"


def _spec(bits: int, point: str) -> dict:
    """The quantizer of a point (name or suffix) at ``bits``."""
    if point.endswith("/weight"):
        return dict(bits=bits, scheme="symmetric", estimator="mse", num_candidates=50)
    scheme = next((s for suf, s in ACT_SCHEMES.items() if point.endswith(suf)), "symmetric")
    return dict(bits=bits, scheme=scheme, estimator="mse", num_candidates=30)


def baseline_rules(off: Sequence[str] = (), bits: int = 8) -> tuple:
    """Every module point at ``bits`` (MSE ranges); ``off``: patterns kept in full precision."""
    rules = [rule(p, label="kept FP", off=True) for p in off]
    rules.append(rule(r"(^|/)attn/gate/", label="gates stay FP", off=True))
    rules.append(
        rule(r"(^|/)" + _WEIGHTS, "weight", f"weights at {bits} bits", **_spec(bits, "x/weight"))
    )
    for suffix in ACT_SCHEMES:
        rules.append(rule(rf"(^|/){suffix}$", "act", suffix, **_spec(bits, suffix)))
    rules.append(rule(r"(^|/)" + _ACTS, "act", f"activations at {bits} bits", **_spec(bits, "x")))
    rules.append(rule(r".", label="everything else stays FP", off=True))
    return tuple(rules)


def module_points(block: str, module: str, fused_qkv: bool = False) -> list[str]:
    """Point names of ``block``'s ``module`` (with fused qkv, v carries the fused weight)."""
    out = []
    for suffix in MODULES[module]:
        if fused_qkv and suffix in ("attn/q_proj/weight", "attn/k_proj/weight"):
            continue
        if fused_qkv and suffix == "attn/v_proj/weight":
            suffix = "attn/qkv_proj/weight"
        out.append(f"{block}/{suffix}")
    return out


def module_rules(block: str, module: str, bits: int, fused_qkv: bool = False) -> tuple:
    """The baseline with ``block``'s ``module`` at ``bits``."""
    low = []
    for point in module_points(block, module, fused_qkv):
        kind = "weight" if point.endswith("/weight") else "act"
        spec = _spec(bits, point)
        low.append(rule(f"^{re.escape(point)}$", kind, f"{point} at {bits} bits", **spec))
    return tuple(low) + baseline_rules()


def blocks_of(params) -> list[str]:
    """Names of the transformer blocks (``layer_3``, Swin's ``stage_1/layer_0``), in order."""
    names = {"/".join(k[: k.index("attn")]) for k in flatten_dict(params) if "attn" in k}
    key = lambda n: [int(x) for x in re.findall(r"\d+", n)]  # noqa: E731
    return sorted(names, key=key)


def fake_quant_np(w: np.ndarray, bits: int, candidates: int = 50) -> np.ndarray:
    """Symmetric per-tensor fake quantization of ``w`` whose clipping range ``r * max|w|``
    (``r`` on a grid of ``candidates`` in (0, 1]) minimises the squared error."""
    qmax = 2 ** (bits - 1) - 1
    m = float(np.abs(w).max())
    if m == 0:
        return w
    best, err = w, np.inf
    for r in np.linspace(1.0 / candidates, 1.0, candidates):
        s = r * m / qmax
        q = np.clip(np.round(w / s), -qmax - 1, qmax) * s
        e = float(np.sum((q - w) ** 2))
        if e < err:
            best, err = q, e
    return best.astype(w.dtype)


def head_params(params, block: str, head: int, num_heads: int, bits: int, fused: bool):
    """``params`` with ``block``'s attention weights at 8 bits except ``head``'s slices (q, k, v
    columns, output projection rows) at ``bits``; each part gets its own MSE range."""
    flat = dict(flatten_dict(params))
    base = tuple(block.split("/")) + ("attn",)
    names = ("qkv_proj",) if fused else ("q_proj", "k_proj", "v_proj")
    for name in names + ("o_proj",):
        path = base + (name, "kernel")
        w = np.asarray(flat[path], np.float32)
        axis = 0 if name == "o_proj" else 1
        d = w.shape[axis] // (3 if name == "qkv_proj" else 1)
        dh = d // num_heads
        sel = np.zeros(w.shape[axis], bool)
        for part in range(w.shape[axis] // d):
            sel[part * d + head * dh : part * d + (head + 1) * dh] = True
        out = np.empty_like(w)
        idx = [slice(None)] * 2
        idx[axis] = ~sel
        out[tuple(idx)] = fake_quant_np(w[tuple(idx)], 8)
        idx[axis] = sel
        out[tuple(idx)] = fake_quant_np(w[tuple(idx)], bits)
        flat[path] = out
    return unflatten_dict(flat)


def _heads_of(cfg: ModelConfig, block: str) -> int:
    m = re.match(r"stage_(\d+)/", block)
    return cfg.stage_heads[int(m.group(1))] if m else cfg.num_heads


def analyse(
    cfg: ModelConfig,
    params,
    calib: Sequence[dict],
    run: Callable,
    bits: int = 2,
    heads: bool = True,
    oscillation: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Module and head sensitivity, FP outlier statistics and oscillation (module docstring).

    ``run(model, variables, outliers=None)`` evaluates and returns metrics with ``loss``
    (as ``qtx.run.evaluate``); ``oscillation``: a QAT run's tracker
    (``TrainState.extra['oscillation']``) or None.
    """
    # a QAT run's learned steps belong to its own plan; the analysis calibrates its own
    flat = flatten_dict(params)
    params = unflatten_dict({k: v for k, v in flat.items() if not quant.is_quantizer_param(k)})

    def calibrated(rules):
        plan = quant.QuantPlan(rules, mode="quantize", calibration="parallel")
        return flatten_dict(calibrate_setup(cfg, plan, params, calib)[quant.STATS])

    stats8, stats_low = calibrated(baseline_rules()), calibrated(baseline_rules(bits=bits))

    def evaluate(rules, low_points=(), p=params):
        """``rules`` with the ranges of ``low_points`` from the low-bit calibration."""
        low = set(low_points)
        stats = {k: (stats_low if "/".join(k[:-1]) in low else stats8)[k] for k in stats8}
        plan = quant.QuantPlan(rules, mode="quantize")
        return run(build(cfg, plan), {"params": p, quant.STATS: unflatten_dict(stats)})

    blocks = blocks_of(params)
    base = evaluate(baseline_rules())
    out = {"bits": bits, "baseline": {"loss": float(base["loss"])}, "modules": {}, "heads": {}}
    log(f"variation: all at 8 bits, loss {base['loss']:.4f}")
    for block in blocks:
        row = {}
        for module in MODULES:
            points = module_points(block, module, cfg.fused_qkv)
            r = evaluate(module_rules(block, module, bits, cfg.fused_qkv), points)
            row[module] = float(r["loss"] - base["loss"])
        out["modules"][block] = row
        worst = max(row, key=row.get)
        log(f"variation: {block} most sensitive at {bits} bits: {worst} (+{row[worst]:.4f})")
        if heads:
            n = _heads_of(cfg, block)
            attn_weights = f"^{re.escape(block)}/attn/(q|k|v|o|qkv)_proj/weight$"
            rules = baseline_rules(off=(attn_weights,))
            out["heads"][block] = [
                float(
                    evaluate(rules, p=head_params(params, block, h, n, bits, cfg.fused_qkv))["loss"]
                    - base["loss"]
                )
                for h in range(n)
            ]

    acts = sorted({s for v in MODULES.values() for s in v if not s.endswith("/weight")})
    track = tuple(rf"(^|/){re.escape(s)}$" for s in acts)
    acc = OutlierAccumulator(cfg.family)
    run(build(cfg, quant.QuantPlan(track=track)), {"params": params}, acc)
    out["outliers"] = acc.summary()["per_layer"]
    out["oscillation"] = None
    if oscillation:
        fr = oscillating_fractions(oscillation)
        out["oscillation"] = {k.removeprefix("oscillating/"): float(v) for k, v in fr.items()}
    return out


def plot(result: dict, path: str, title: str = "") -> None:
    """Heatmaps (blocks x modules / heads / module inputs) of the sensitivities, the kurtosis
    and the oscillating fractions of :func:`analyse`'s ``result``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(result["modules"])
    panels = [("module sensitivity: delta loss", list(MODULES), result["modules"])]
    if result["heads"]:
        width = max(len(v) for v in result["heads"].values())
        heads = {b: dict(enumerate(v)) for b, v in result["heads"].items()}
        panels.append(("head sensitivity: delta loss", list(range(width)), heads))
    kurt = {}
    for name, v in result["outliers"].items():
        for b in blocks:
            if name.startswith(b + "/"):
                kurt.setdefault(b, {})[name[len(b) + 1 :]] = np.log10(max(v["kurtosis"], 1e-3))
    cols = sorted({c for v in kurt.values() for c in v})
    panels.append(("log10 kurtosis of module inputs (FP)", cols, kurt))
    if result.get("oscillation"):
        osc = {}
        for name, v in result["oscillation"].items():
            for b in blocks:
                if name.startswith(b + "/"):
                    osc.setdefault(b, {})[name[len(b) + 1 :]] = v
        panels.append(("oscillating fraction", sorted({c for v in osc.values() for c in v}), osc))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 1.5 + 0.35 * len(blocks)), squeeze=False
    )
    for ax, (name, columns, table) in zip(axes[0], panels, strict=True):
        grid = np.array(
            [[table.get(b, {}).get(c, np.nan) for c in columns] for b in blocks], np.float64
        )
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([str(c) for c in columns], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)))
        ax.set_yticklabels(blocks, fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title or f"quantization variation at {result['bits']} bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
