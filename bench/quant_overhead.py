"""Fake-quantization cost relative to full precision (FP), on one tensor and on a small MLP.

Command (from the repository root)::

    python bench/quant_overhead.py            # 4096x4096 tensor, MLP 1024-4096-4096-1024 x 256
    python bench/quant_overhead.py --quick    # 2048x2048 tensor, MLP 512-2048-2048-512 x 128
    python bench/quant_overhead.py --repeats 11 --bwd sum --no-donate --out /tmp/q.json

Timing (``bench/common.py``): every case is jitted, called once to compile and once more to
warm up, then timed ``--repeats`` times, the cases of one group interleaved round by round;
each call ends in ``jax.block_until_ready``. Cases under 0.2 s are timed as batches of calls.
Reported: the median per case and, as ``ratio``, the median over rounds of quant / FP;
``quiet ratio`` uses only rounds in which other processes kept < 0.3 cores busy.

1. **One large float32 tensor** ``x``. A fake-quant point replaces an identity, whose cost
   in a network is zero, so the FP baseline is the cheapest op with the same memory traffic
   that XLA cannot elide: ``x * 1.0001``. Forward: ``y = f(x)`` (read x, write y).
   Forward + backward: ``y, dx[, dstep]`` of ``jax.vjp`` for a random upstream cotangent,
   which is what a point costs inside a network's backward pass (FP: ``1.0001 * ct``).
   ``--bwd sum`` takes ``value_and_grad(sum(f(x)))`` instead: there the cotangent is a
   constant, and XLA CPU runs a reduction fused with elementwise outputs slowly, for FP and
   quant alike, which hides the quantizer. Inputs are donated and the outputs fed back
   (``--no-donate`` turns this off), so no call maps fresh output pages. A backward pass that
   reads ``x`` again (LSQ's recomputes ``x * (1/s)`` from it) then also pays for XLA's copies
   of the donated ``x`` and ``ct`` (their outputs ``y`` and ``dx`` overwrite them), which a
   quantizer inside a network does not: compare with ``--no-donate``. Cases:

   * ``int8 tensor``: frozen per-tensor asymmetric INT8 (``fake_quant_range`` with a
     calibrated range passed in as an argument);
   * ``int8 channel``: frozen per-channel symmetric INT8 (one range per column);
   * ``int8 dynamic``: per-tensor current min-max INT8 (range recomputed in every call);
   * ``lsq 4-bit``: symmetric 4-bit LSQ (``uniform_quant`` with a learnable step);
   * fwd+bwd ``STE int8 tensor``: the clipped straight-through gradient w.r.t. ``x``;
   * fwd+bwd ``LSQ 4-bit``: gradients w.r.t. ``x`` and the step (a full reduction).

2. **A small MLP** of ``qtx.nn.Dense`` layers (ReLU between them) with activation
   ``QuantPoint``s on the input and after every layer (weights have their points inside
   ``Dense``), MSE loss: FP (plan off) vs W8A8 (``setup_rules("W8A8")``, calibrated with
   ``qtx.quant.calibrate`` on two batches, then mode ``quantize``; weights use the dynamic
   ``current_minmax`` range of the preset) vs W4A4 LSQ in mode ``learn`` (QV-style rules:
   acts ``learn="lsq", estimator="lsq_init"``, weights ``estimator="iterative"``, steps
   initialised by calibration). Timed: the jitted loss (forward) and the jitted
   ``value_and_grad`` w.r.t. all params (forward + backward).

Table: case | FP ms | quant ms | ratio | quiet ratio. The JSON also has min / max / all
samples, the first (compiling) call, page faults per call, settings and the machine.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from common import Run, base_parser, blocking, measure, paired_ratio, table

import qtx.quant as q
from qtx.nn import Dense
from qtx.quant.estimators import estimate, minmax
from qtx.quant.primitives import grad_scale_value, grid_bounds, uniform_quant
from qtx.quant.ranges import fake_quant_range, make_view
from qtx.quant.spec import QuantSpec


def chained(fn, donated: tuple, rest: tuple = (), donate: bool = True):
    """A blocking call of ``jit(fn)(*donated, *rest)``. With ``donate``, the ``donated``
    buffers are donated and the first outputs of the tensor's shape are fed back as the next
    call's ``donated`` arguments, so that no call allocates (and page-faults in) a fresh output
    buffer; the work of a call does not depend on the values."""
    f = jax.jit(fn, donate_argnums=tuple(range(len(donated))) if donate else ())
    shape = donated[0].shape
    box = [tuple(jnp.array(a, copy=True) for a in donated)]

    def call():
        out = jax.block_until_ready(f(*box[0], *rest))
        if donate:
            big = [a for a in jax.tree.leaves(out) if a.shape == shape]
            box[0] = tuple(big[: len(donated)])
        return out

    return call


def tensor_cases(n: int, donate: bool, bwd_mode: str) -> tuple[dict, dict]:
    """Forward and forward+backward cases on an (n, n) tensor: ``{name: blocking call}``."""
    k = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k[0], (n, n), jnp.float32)
    ct = jax.random.normal(k[1], (n, n), jnp.float32)  # upstream gradient of the point
    t8 = QuantSpec(bits=8, scheme="asymmetric", estimator="minmax")
    c8 = QuantSpec(bits=8, scheme="symmetric", granularity="channel", estimator="minmax")
    d8 = QuantSpec(bits=8, scheme="asymmetric", estimator="current_minmax")
    tv, cv = make_view(x.shape, t8), make_view(x.shape, c8, channel_axis=-1)
    t_lo, t_hi = minmax(x, tv, t8)  # "calibrated" ranges, passed as traced arguments
    c_lo, c_hi = minmax(x, cv, c8)
    qmin, qmax = grid_bounds(4, "symmetric")
    step = 2.0 * jnp.mean(jnp.abs(x)) / jnp.sqrt(qmax)  # LSQ init
    g = grad_scale_value("lsq", x, 1, qmax)
    zero = jnp.zeros((), jnp.float32)

    def fp(x):
        return x * 1.0001

    def int8_tensor(x, lo, hi):
        return fake_quant_range(x, lo, hi, t8)

    def int8_channel(x, lo, hi):
        return fake_quant_range(x, lo, hi, c8)

    def int8_dynamic(x):
        lo, hi = estimate(x, tv, d8)
        return fake_quant_range(x, lo, hi, d8)

    def lsq4(x, s):
        return uniform_quant(x, s, zero, qmin, qmax, g)

    def fwd_bwd(f, learn_step=False):
        """``vjp``: (y, dx[, dstep]) for the cotangent ``ct``; ``sum``: value_and_grad(sum)."""
        if bwd_mode == "sum":
            return jax.value_and_grad(lambda x, *a: jnp.sum(f(x, *a)), (0, 1) if learn_step else 0)

        def vjp(x, ct, *a):
            if learn_step:
                y, pull = jax.vjp(f, x, *a)
                return y, *pull(ct)
            y, pull = jax.vjp(lambda x: f(x, *a), x)
            return y, pull(ct)[0]

        return vjp

    def bcase(f, rest=(), learn_step=False):
        donated = (x,) if bwd_mode == "sum" else (x, ct)
        return chained(fwd_bwd(f, learn_step), donated, rest, donate)

    fwd = {
        "FP x*1.0001": chained(fp, (x,), (), donate),
        "int8 tensor (frozen)": chained(int8_tensor, (x,), (t_lo, t_hi), donate),
        "int8 channel (frozen)": chained(int8_channel, (x,), (c_lo, c_hi), donate),
        "int8 tensor (dynamic min-max)": chained(int8_dynamic, (x,), (), donate),
        "lsq 4-bit": chained(lsq4, (x,), (step,), donate),
    }
    bwd = {
        "FP x*1.0001": bcase(fp),
        "STE int8 tensor, d/dx": bcase(int8_tensor, (t_lo, t_hi)),
        "LSQ 4-bit, d/dx and d/dstep": bcase(lsq4, (step,), learn_step=True),
    }
    return fwd, bwd


class MLP(nn.Module):
    """Dense layers of ``widths`` with ReLU between them; act points ``in``, ``act<i>``,
    ``out``; weight points ``fc<i>/weight``."""

    widths: tuple[int, ...]
    plan: q.QuantPlan = q.QuantPlan()

    @nn.compact
    def __call__(self, x):
        x = q.QuantPoint(self.plan, name="in")(x)
        for i, w in enumerate(self.widths):
            x = Dense(w, self.plan, name=f"fc{i}")(x)
            last = i == len(self.widths) - 1
            x = x if last else jax.nn.relu(x)
            x = q.QuantPoint(self.plan, name="out" if last else f"act{i}")(x)
        return x


def lsq_rules(bits: int = 4):
    """W4A4 LSQ in the style of the ``qv_lsq`` preset (unsigned grids after ReLU)."""
    lsq = dict(bits=bits, learn="lsq", min_scale=1e-4)
    act = dict(lsq, estimator="lsq_init", grad_scale="act_qv")
    return (
        q.rule(r"(^|/)act\d+$", "act", "post-ReLU acts", scheme="unsigned", **act),
        q.rule(r".", "act", "input and output", scheme="symmetric", **act),
        q.rule(
            r".", "weight", scheme="symmetric", estimator="iterative", grad_scale="weight_l1", **lsq
        ),
    )


def mlp_cases(d_in: int, hidden: int, batch: int) -> tuple[dict, dict, dict]:
    widths = (hidden, hidden, d_in)
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (batch, d_in), jnp.float32)
    target = jax.random.normal(k[1], (batch, d_in), jnp.float32)
    calib = [jax.random.normal(kk, (batch, d_in), jnp.float32) for kk in k[2:]]
    params = MLP(widths).init(jax.random.key(2), x)["params"]

    def setup(rules, mode):
        """Variables after calibration, and the model in ``mode``."""
        cal = MLP(widths, q.QuantPlan(rules, mode="calibrate"))
        v = cal.init(jax.random.key(2), x)  # the same kernels: same key, same init order
        fwd = lambda v, b: cal.apply(v, b, mutable=[q.STATS])
        v = q.init_learnable(q.calibrate(fwd, v, calib))
        return v, MLP(widths, q.QuantPlan(rules, mode=mode))

    variants = {"FP (plan off)": ({"params": params}, MLP(widths))}
    variants["W8A8 frozen (quantize)"] = setup(q.setup_rules("W8A8"), "quantize")
    variants["W4A4 LSQ (learn)"] = setup(lsq_rules(4), "learn")
    fwd, bwd = {}, {}
    for name, (v, model) in variants.items():
        extra = {c: t for c, t in v.items() if c != "params"}

        def loss(p, extra, x, t, model=model):
            return jnp.mean((model.apply({"params": p, **extra}, x) - t) ** 2)

        fwd[name] = blocking(jax.jit(loss), v["params"], extra, x, target)
        bwd[name] = blocking(jax.jit(jax.value_and_grad(loss)), v["params"], extra, x, target)
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    info = {"widths": (d_in, *widths), "batch": batch, "params": n_params}
    return fwd, bwd, info


def compare(label: str, res: dict, fp: str) -> list[list]:
    """Rows ``label: case | FP ms | quant ms | ratio | quiet ratio`` against the case ``fp``;
    ratios are medians over rounds of quant / FP (all rounds; quiet rounds only)."""
    base = res[fp]
    return [
        [
            f"{label}: {name}",
            base["median_ms"],
            r["median_ms"],
            paired_ratio(r, base),
            paired_ratio(r, base, quiet=True),
        ]
        for name, r in res.items()
        if name != fp
    ]


def main():
    p = base_parser(__doc__, "quant_overhead")
    p.add_argument("--size", type=int, default=None, help="tensor side (default 4096; quick 2048)")
    p.add_argument(
        "--no-donate",
        dest="donate",
        action="store_false",
        help="tensor cases allocate a fresh output per call (includes page-fault cost)",
    )
    p.add_argument(
        "--bwd",
        choices=("vjp", "sum"),
        default="vjp",
        help="tensor fwd+bwd: vjp with a random cotangent (default) or value_and_grad of sum",
    )
    args = p.parse_args()
    n = args.size or (2048 if args.quick else 4096)
    d_in, hidden, batch = (512, 2048, 128) if args.quick else (1024, 4096, 256)
    run = Run("quant_overhead")
    print(f"devices: {jax.devices()}  repeats: {args.repeats}")

    fwd, bwd = tensor_cases(n, args.donate, args.bwd)
    t_fwd = measure(fwd, args.repeats, min_sample_s=0.2)
    t_bwd = measure(bwd, args.repeats, min_sample_s=0.2)
    m_fwd, m_bwd, mlp_info = mlp_cases(d_in, hidden, batch)
    r_fwd = measure(m_fwd, args.repeats, warmup=2, min_sample_s=0.2)
    r_bwd = measure(m_bwd, args.repeats, warmup=2, min_sample_s=0.2)

    fp_fwd, fp_bwd, fp_mlp = next(iter(fwd)), next(iter(bwd)), next(iter(m_fwd))
    rows = (
        compare(f"{n}x{n} fwd", t_fwd, fp_fwd)
        + compare(f"{n}x{n} fwd+bwd", t_bwd, fp_bwd)
        + compare("MLP fwd", r_fwd, fp_mlp)
        + compare("MLP value_and_grad", r_bwd, fp_mlp)
    )
    widths = "-".join(map(str, mlp_info["widths"]))
    print(f"\nFP baseline of the tensor cases: x*1.0001; MLP {widths} x {batch}")
    print(table(["case", "FP ms", "quant ms", "ratio", "quiet ratio"], rows))
    groups = {"fwd": t_fwd, "fwd+bwd": t_bwd, "MLP fwd": r_fwd, "MLP vg": r_bwd}
    faulting = [
        f"{g}: {name} ({r['page_faults_per_call']:.0f})"
        for g, res in groups.items()
        for name, r in res.items()
        if r["page_faults_per_call"] > 1000
    ]
    if faulting:
        print("minor page faults per call (large XLA buffers are mapped afresh on every call):")
        print("  " + "; ".join(faulting))
    run.finish(
        args.out,
        settings=vars(args),
        tensor={"dtype": "float32", "shape": [n, n], "forward": t_fwd, "fwd_bwd": t_bwd},
        mlp={**mlp_info, "forward": r_fwd, "value_and_grad": r_bwd},
        table=[
            dict(zip(("case", "fp_ms", "quant_ms", "ratio", "quiet_ratio"), r, strict=True))
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
