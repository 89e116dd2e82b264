"""Training throughput (tokens/s) and MFU of qtx OPT models, next to HF PyTorch and QAT.

Command (from the repository root)::

    python bench/train_throughput.py            # opt125m_gated.py:tiny and the full opt-125m
    python bench/train_throughput.py --quick    # the tiny config only, 1024^2 matmul peak
    python bench/train_throughput.py --batch 4 --seq_len 128 --steps 2 --repeats 5

What is measured (medians over ``--repeats`` timed samples after a compile/warm-up step; a
sample is ``--steps`` consecutive train steps, each ending in ``jax.block_until_ready``):

* **Matmul peak**: jitted ``a @ b`` on square float32 matrices (n = 2048 on CPU, 1024 with
  ``--quick``, 4096 on GPUs, where bfloat16 is measured too): ``2 n^3 / t``, at the start
  and at the end of the run; MFU uses the higher (a busy machine gives a low peak).
* **qtx FP**: for each config (``configs/opt125m_gated.py:tiny`` at its own batch, and the
  full ``configs/opt125m_gated.py`` at ``--batch`` x ``--seq_len``, default 2 x 256), the
  model of ``qtx.train.experiment.load(config)`` (float32 on CPU, ``grad_accum`` 1), the
  config's optimizer (``make_optimizer``) and the jitted ``make_train_step`` with
  ``donate_argnums=(0,)``, fed random token batches (no data pipeline).
* **qtx QAT**: the same step with ``QuantPlan(setup_rules("W8A8"), mode="learn")``;
  activation ranges are calibrated once on a random batch (``qtx.quant.calibrate``) and
  travel in ``TrainState.extra["quant_stats"]``.
* **HF PyTorch**: ``transformers.OPTForCausalLM`` of the same shape (``hf_config``; no gate:
  the HF model has vanilla attention), random init, ``torch.set_num_threads(<cores>)``, one
  AdamW step with global-norm clipping 1.0 (forward + backward + step), in float32.

Model FLOPs per token: ``6 N + 12 L T d`` (N = parameters without the position table, so
the tied embedding / LM head counts once; L layers, T tokens per sequence, d width; the
second term is attention scores and context, forward + backward, without a causal
discount). MFU = tokens/s * FLOPs per token / jax matmul peak in the compute dtype.

The frameworks of a config are timed interleaved, round by round. Table: config |
framework | tokens/s | step ms | MFU (medians of all samples) | the median step of the quiet
samples (other processes kept < 0.3 cores busy) and their count; then the qtx/HF throughput
and QAT/FP step-time ratios (medians of per-round ratios: all rounds, quiet rounds). The
JSON has everything (min/max, first call, losses, parameter counts, torch's matmul peak).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    Run,
    available_cores,
    base_parser,
    matmul_peak,
    measure,
    paired_ratio,
    table,
)
from flax.traverse_util import flatten_dict

import qtx.quant as q
from qtx.hf.convert_opt import hf_config
from qtx.models import build, dummy_inputs
from qtx.train.experiment import load as load_experiment
from qtx.train.losses import model_inputs
from qtx.train.optim import make_optimizer
from qtx.train.steps import create_state, make_train_step

QAT, HF = "qtx W8A8 QAT", "HF torch"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(spec: str):
    """``path[:arg]`` -> the ml_collections config of ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # the config files import ``configs.common``
    name = "bench_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def torch_matmul_peak(n: int, repeats: int) -> dict:
    import torch

    a = torch.randn(n, n)
    r = measure({"mm": lambda: a @ a}, repeats, min_sample_s=0.2)["mm"]
    return {"n": n, "dtype": "float32", **r, "flops": 2 * n**3 / r["median_ms"] * 1e3}


def random_batches(vocab: int, b: int, t: int, n: int = 4) -> list[dict]:
    keys = jax.random.split(jax.random.key(42), n)
    ids = [jax.random.randint(k, (b, t), 3, vocab, jnp.int32) for k in keys]
    return [{"input_ids": x, "attention_mask": jnp.ones_like(x)} for x in ids]


def count_params(params, skip: str) -> int:
    """Parameters whose path does not contain ``skip`` (the position table)."""
    flat = flatten_dict(params, sep="/")
    return int(sum(v.size for k, v in flat.items() if skip not in k))


def qtx_step(exp, plan, batches):
    """``(blocking call of one train step, n_params, losses)`` for ``plan``."""
    cfg = exp.model
    model = build(cfg, plan)
    tx, schedule = make_optimizer(exp.optim, int(exp.train["steps"]))
    init_rng, base_rng = jax.random.split(jax.random.key(0))
    t = batches[0]["input_ids"].shape[1]
    variables = model.init(init_rng, **dummy_inputs(cfg, batch=1, seq_len=t))
    if plan.mode != "off":  # QAT: frozen activation ranges from one calibration batch
        cal = build(cfg, plan.with_mode("calibrate"))
        fwd = lambda v, b: cal.apply(v, **model_inputs(cfg.family, b), mutable=[q.STATS])
        variables = q.init_learnable(q.calibrate(fwd, variables, batches[:1]))
    params = variables.pop("params")
    n_params = count_params(params, "embed/position")
    state = create_state(params, tx, dict(variables))
    step = make_train_step(model, cfg.family, exp.task, tx, schedule, base_rng, grad_accum=1)
    p_step = jax.jit(step, donate_argnums=(0,))
    box, losses = [state, 0], []

    def call():
        st, i = box
        st, metrics = jax.block_until_ready(p_step(st, batches[i % len(batches)]))
        box[:] = [st, i + 1]
        losses.append(metrics["loss"])

    return call, n_params, losses


def hf_step(cfg, batches, optim: dict):
    """``(blocking call of one HF train step, n_params, losses, info)``."""
    import torch
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = OPTForCausalLM(hf_config(cfg)).to(dev).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=optim["lr"],
        betas=(optim["b1"], optim["b2"]),
        eps=optim["eps"],
        weight_decay=optim["weight_decay"],
    )
    data = [
        {k: torch.from_numpy(np.array(v)).long().to(dev) for k, v in b.items()} for b in batches
    ]
    box, losses = [0], []

    def call():
        b = data[box[0] % len(data)]
        box[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]
        ).loss
        loss.backward()
        if optim["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim["clip_norm"])
        opt.step()
        losses.append(loss.item())  # host sync

    n = sum(p.numel() for name, p in model.named_parameters() if "embed_positions" not in name)
    info = {
        "device": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
    }
    return call, n, losses, info


def bench_config(spec: str, args, gpu: bool) -> dict:
    config = get_config(spec)
    if not gpu:
        config.model.dtype = "float32"
    if ":" not in spec:  # the full model: small batch on CPU
        config.data.batch_size, config.data.seq_len = args.batch, args.seq_len
    config.optim.grad_accum = 1
    exp = load_experiment(config)
    cfg = exp.model
    b, t = int(config.data.batch_size), int(config.data.seq_len)
    batches = random_batches(cfg.vocab_size, b, t)
    print(
        f"{spec}: {cfg.num_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"batch {b} x {t}, dtype {cfg.dtype}",
        flush=True,
    )
    calls, n_params, losses = {}, {}, {}
    calls["qtx FP"], n_params["qtx FP"], losses["qtx FP"] = qtx_step(exp, exp.plan, batches)
    qat_plan = q.QuantPlan(q.setup_rules("W8A8"), mode="learn")
    calls[QAT], n_params[QAT], losses[QAT] = qtx_step(exp, qat_plan, batches)
    hf_info = None
    if not args.no_hf:
        calls[HF], n_params[HF], losses[HF], hf_info = hf_step(cfg, batches, exp.optim)
    steps = max(args.steps, 1)
    multi = {k: (lambda f=f: [f() for _ in range(steps)]) for k, f in calls.items()}
    res = measure(multi, args.repeats, min_sample_s=args.min_sample_s)  # interleaved rounds
    tokens, fw = b * t, {}
    for name, r in res.items():
        quiet = r["quiet_median_ms"] and r["quiet_median_ms"] / steps
        fw[name] = {
            **r,
            "step_ms": r["median_ms"] / steps,
            "quiet_step_ms": quiet,
            "tokens_per_s": tokens / r["median_ms"] * steps * 1e3,
            "flops_per_token": 6 * n_params[name] + 12 * cfg.num_layers * t * cfg.hidden_size,
            "params_no_positions": n_params[name],
            "last_losses": [float(x) for x in losses[name][-3:]],
        }
    # ratios of the same rounds (robust to drifts of the machine's load)
    pairs = {"QAT / FP step time": (QAT, "qtx FP")}
    if HF in res:
        pairs["qtx FP / HF tokens/s"] = (HF, "qtx FP")
        pairs["qtx QAT / HF tokens/s"] = (HF, QAT)
    ratios = {
        k: {"all": paired_ratio(res[a], res[b]), "quiet": paired_ratio(res[a], res[b], True)}
        for k, (a, b) in pairs.items()
    }
    out = {
        "batch": b,
        "seq_len": t,
        "tokens_per_step": tokens,
        "model": dataclasses.asdict(cfg),
        "frameworks": fw,
        "ratios": ratios,
        "hf": hf_info,
    }
    return out


def mfu_rows(spec: str, res: dict, peak: dict) -> list[list]:
    """Table rows of one config; adds ``mfu`` (vs the jax peak of the compute dtype)."""
    use = peak.get(res["model"]["dtype"], peak["float32"])
    rows = []
    for name, r in res["frameworks"].items():
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / use["flops"]
        nq = f"{r['quiet_samples']}/{len(r['times_ms'])}"
        mfu = f"{100 * r['mfu']:.1f}%"
        rows.append([spec, name, r["tokens_per_s"], r["step_ms"], mfu, r["quiet_step_ms"], nq])
    res["peak_used"] = {k: use[k] for k in ("n", "dtype", "flops")}
    return rows


def peaks(gpu: bool, n: int, repeats: int, when: str) -> dict:
    """jax matmul peaks (float32; bfloat16 on GPUs), printed."""
    out = {"float32": matmul_peak(n, jnp.float32, repeats)}
    if gpu:
        out["bfloat16"] = matmul_peak(n, jnp.bfloat16, repeats)
    for k, v in out.items():
        print(f"matmul peak {k} n={n} ({when}): {v['flops'] / 1e9:,.1f} GFLOP/s (jax)", flush=True)
    return out


def main():
    p = base_parser(__doc__, "train_throughput")
    p.add_argument("--batch", type=int, default=2, help="full model: sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="full model: tokens per sequence")
    p.add_argument("--steps", type=int, default=1, help="train steps per timed sample")
    p.add_argument("--configs", nargs="*", default=None, help="config specs (path[:arg])")
    p.add_argument("--no_hf", action="store_true", help="skip the HF PyTorch comparison")
    p.add_argument("--min_sample_s", type=float, default=0.3, help="min seconds per sample")
    args = p.parse_args()
    run = Run("train_throughput")
    gpu = jax.default_backend() != "cpu"
    tiny, full = "configs/opt125m_gated.py:tiny", "configs/opt125m_gated.py"
    specs = args.configs or ([tiny] if args.quick else [tiny, full])
    import torch

    torch.set_num_threads(available_cores())
    n = 4096 if gpu else 1024 if args.quick else 2048
    peak_start = peaks(gpu, n, args.repeats, "start")
    peak_torch = None if gpu else torch_matmul_peak(n, args.repeats)
    if peak_torch:
        gflops = peak_torch["flops"] / 1e9
        print(f"matmul peak float32 n={n}: {gflops:,.1f} GFLOP/s (torch, for reference)")
    results = {spec: bench_config(spec, args, gpu) for spec in specs}
    peak_end = peaks(gpu, n, args.repeats, "end")
    # MFU against the higher of the two: a peak measured while others load the CPU is low
    peak = {k: max(v, peak_end[k], key=lambda r: r["flops"]) for k, v in peak_start.items()}
    rows = [row for spec, res in results.items() for row in mfu_rows(spec, res, peak)]
    ratios = [
        [spec, k, v["all"], v["quiet"]]
        for spec, res in results.items()
        for k, v in res["ratios"].items()
    ]
    print()
    head = ["config", "framework", "tokens/s", "step ms", "MFU", "quiet step ms", "quiet n"]
    print(table(head, rows))
    print()
    print(table(["config", "ratio (median over rounds)", "all rounds", "quiet rounds"], ratios))
    run.finish(
        args.out,
        settings=vars(args),
        flops_per_token="6*N + 12*L*T*d (N without position embeddings)",
        matmul_peak={"start": peak_start, "end": peak_end, "used_for_mfu": peak},
        matmul_peak_torch=peak_torch,
        configs=results,
    )


if __name__ == "__main__":
    main()
