"""Training throughput, MFU, compile time and memory of qtx models, next to HF PyTorch and QAT.

Command (from the repository root)::

    python bench/train_throughput.py            # 4 models x 4 cases, native and AVX2 ISA
    python bench/train_throughput.py --quick    # opt125m_gated.py:tiny only, 1024^2 peak
    python bench/train_throughput.py --isa native --configs configs/bert_base_vanilla.py
    python bench/train_throughput.py --batch 4 --seq_len 128 --steps 2 --cases fp hf

Models (``--configs``; ``path[:arg]`` specs): ``configs/opt125m_gated.py:tiny`` at its own
batch, the full ``configs/opt125m_gated.py`` (causal LM) and ``configs/bert_base_vanilla.py``
(BERT-base MLM, ~15 % of the positions masked) at ``--batch`` x ``--seq_len`` (default
2 x 256), ``configs/vit_s16_vanilla.py`` (ViT-S/16, 224^2 images) at ``--vit_batch`` (8).
A spec with ``:arg`` keeps its config's batch. On CPU every model runs in float32; on a GPU
in its config's dtype (bfloat16 compute for the full models).

Cases (``--cases``) per model, from ``qtx.run.experiment.load(config)`` (``grad_accum`` 1,
the config's optimizer, ``make_train_step`` jitted with ``donate_argnums=(0,)``, random
batches, no data pipeline):

* ``fp``: qtx in full precision (the config's plan);
* ``w8a8``: ``QuantPlan(setup_rules("W8A8"), mode="learn")``, activation ranges calibrated
  once on a random batch, carried in ``TrainState.extra["quant_stats"]``;
* ``w4a4``: ``QuantPlan(setup_rules("qv_lsq:W4A4"), mode="learn")``, LSQ steps initialised
  by the calibration (``qtx.quant.init_learnable``);
* ``hf``: ``transformers`` model of the same shape (``bench/hf_steps.py``: OPTForCausalLM,
  BertForMaskedLM, ViTForImageClassification), random init, AdamW + clipping as the config,
  ``torch.set_num_threads(<cores>)``.

Instruction set (``--isa``, CPU only): ``native`` runs with what the CPU has, ``avx2`` caps
XLA (``XLA_FLAGS+=--xla_cpu_max_isa=AVX2``), ATen (``ATEN_CPU_CAPABILITY=avx2``), oneDNN
(``ONEDNN_MAX_CPU_ISA``) and MKL (``MKL_ENABLE_INSTRUCTIONS``) at AVX2. The environment is
set before jax and torch are imported; ``both`` (default) runs the script once per ISA in a
child process and merges the JSON. On a GPU backend ``--isa`` is ignored (one run).

Memory: the script restarts itself once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (see
``qtx.hugepages``; ``QTX_HUGE_PAGES=0`` measures without), as ``train.py`` and ``eval.py``
do; PyTorch runs in the same processes, so both frameworks get it.

Timing: medians over ``--repeats`` samples of ``--steps`` train steps each (at least
``--min_sample_s``), every step ending in ``jax.block_until_ready`` / a host sync; the
cases of a model are timed interleaved, round by round. Each case is first built and run for
two steps while a thread samples the process's resident memory (``VmRSS``, every 5 ms, plus
the reset high-water mark): ``peak RSS`` is the peak minus the RSS before the build. ``1st
step`` is the first train step including XLA compilation (``compile`` alone: ``lower`` +
``compile``); ``XLA MiB`` is the compiled step's ``memory_analysis()``: arguments + outputs
- aliased (donated) outputs + temporaries.

Model FLOPs per token: ``6 N + 12 L T d`` (N parameters without the position table, L
layers, T tokens per sequence, d width; the second term is attention scores and context,
forward + backward, no causal discount). For ViT T = patches + 1 (class token) per image and
images/s = tokens/s / T. MFU = tokens/s x FLOPs per token / the jax matmul peak (square
``a @ a``, float32 n = 2048 on CPU, 1024 with ``--quick``; on GPUs n = 4096 and bfloat16
too, which the bfloat16 models use), measured at the start and the end of each ISA run
(MFU uses the higher).
"""

from __future__ import annotations

import os
import sys

from qtx.hugepages import reexec_with_huge_pages

ISAS = ("native", "avx2")
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
XLA_ISA = "--xla_cpu_max_isa"


def argv_isa(argv: list[str]) -> str:
    """The ``--isa`` value of the command line (default ``both``), read before argparse."""
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.partition("=")[2]
    return "both"


def isa_env(isa: str, env) -> dict[str, str]:
    """``env`` for ``isa``: ``avx2`` appends ``--xla_cpu_max_isa=AVX2`` to ``XLA_FLAGS`` and
    sets ``AVX2_ENV``; ``native`` removes both (other XLA flags are kept)."""
    env = {k: v for k, v in env.items() if k not in AVX2_ENV}
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith(XLA_ISA)]
    if isa == "avx2":
        flags.append(f"{XLA_ISA}=AVX2")
        env.update(AVX2_ENV)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def settle_isa() -> None:
    """Puts the environment of ``--isa native|avx2`` in place before jax and torch are
    imported (they read it when they start); re-executes the script if they already are.
    ``--isa both`` leaves it alone: it starts one child process per ISA."""
    isa = argv_isa(sys.argv[1:])
    if isa not in ISAS:
        return
    want = isa_env(isa, os.environ)
    if want == dict(os.environ):
        return
    if {"jax", "torch"} & set(sys.modules):
        os.execve(sys.executable, [sys.executable, *sys.argv], want)
    for k in set(os.environ) - set(want):
        del os.environ[k]
    os.environ.update(want)


reexec_with_huge_pages()  # both frameworks' large buffers on huge pages (qtx.hugepages)
settle_isa()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    PeakRSS,
    Run,
    available_cores,
    base_parser,
    get_config,
    int8_matmul_peak,
    matmul_peak,
    measure,
    paired_ratio,
    rewrite_readme,
    table,
    write_json,
)
from flax.traverse_util import flatten_dict  # noqa: E402
from throughput_readme import readme_block  # noqa: E402

import qtx.quant as q  # noqa: E402
from qtx.evaluate.ptq import calibrate_setup  # noqa: E402
from qtx.models import build, dummy_inputs  # noqa: E402
from qtx.models.family import family_names, family_record  # noqa: E402
from qtx.run.experiment import load as load_experiment  # noqa: E402
from qtx.train.optim import make_optimizer  # noqa: E402
from qtx.train.steps import create_state, make_train_step  # noqa: E402

FP, W8, W4, HF = "qtx FP", "qtx W8A8 QAT", "qtx W4A4 LSQ QAT", "HF torch"
CASES = {"fp": FP, "w8a8": W8, "w4a4": W4, "hf": HF}
QAT_SETUPS = {"w8a8": "W8A8", "w4a4": "qv_lsq:W4A4"}  # case -> setup_rules string
SPECS = (
    "configs/opt125m_gated.py:tiny",
    "configs/opt125m_gated.py",
    "configs/bert_base_vanilla.py",
    "configs/vit_s16_vanilla.py",
)
FLOPS = {
    "text (clm, mlm)": "6*N + 12*L*T*d per token (N without position embeddings, T = seq_len)",
    "image (vit)": "6*N + 12*L*T*d per token, T = patches + 1 tokens per image",
}
MASK_ID = 103  # [MASK] of bert-base-uncased (any id works for timing)


def short(spec: str) -> str:
    return spec.removeprefix("configs/").replace(".py", "")


def tokens_per_example(cfg, seq_len: int) -> int:
    """Sequence length of text models; patches + class (+ distillation) token of ViTs
    (``Family.tokens_per_example``)."""
    count = family_record(cfg.family).tokens_per_example
    if count is None:
        counted = [n for n in family_names() if family_record(n).tokens_per_example]
        raise ValueError(f"family {cfg.family!r} is not supported ({', '.join(counted)})")
    return count(cfg, seq_len)


def random_batches(task: str, cfg, b: int, t: int, n: int = 4) -> list[dict]:
    """``n`` random batches in the layout of the task's data pipeline."""
    rng, out = np.random.default_rng(42), []
    for _ in range(n):
        if task == "image":
            shape = (b, cfg.image_size, cfg.image_size, cfg.num_channels)
            image = rng.standard_normal(shape, np.float32)
            label = rng.integers(0, cfg.num_labels, b, dtype=np.int32)
            out.append({"image": jnp.asarray(image), "label": jnp.asarray(label)})
            continue
        ids = rng.integers(3, cfg.vocab_size, (b, t), dtype=np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if task == "mlm":  # BERT masking: ~15 % of the positions predicted, all shown as [MASK]
            sel = rng.random((b, t)) < 0.15
            sel[:, 1] = True
            batch.update(
                input_ids=np.where(sel, min(MASK_ID, cfg.vocab_size - 1), ids).astype(np.int32),
                token_type_ids=np.zeros_like(ids),
                targets=ids,
                weights=sel.astype(np.float32),
            )
        out.append({k: jnp.asarray(v) for k, v in batch.items()})
    return out


def count_params(params, skip=("embed/position", "pooler/")) -> int:
    """Parameters whose path contains none of ``skip`` (the position table; BERT's pooler,
    which an MLM loss does not use)."""
    flat = flatten_dict(params, sep="/")
    return int(sum(v.size for k, v in flat.items() if not any(s in k for s in skip)))


def xla_memory(compiled) -> dict | None:
    """MiB of ``compiled.memory_analysis()``; ``total`` = arguments + outputs - aliased
    (donated) outputs + temporaries. None where the backend has no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend / version implements it
        return None
    if m is None:
        return None
    keys = ("argument", "output", "alias", "temp", "generated_code")
    out = {k: getattr(m, f"{k}_size_in_bytes", 0) / 2**20 for k in keys}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def qtx_step(exp, plan, batches, seq_len: int):
    """``(blocking call of one train step, info)``; the first call compiles (ahead of time,
    so that ``info`` gets the compile time and XLA's memory analysis)."""
    cfg = exp.model
    model = build(cfg, plan)
    tx, schedule = make_optimizer(exp.optim, int(exp.train["steps"]))
    init_rng, base_rng = jax.random.split(jax.random.key(0))
    variables = model.init(init_rng, **dummy_inputs(cfg, batch=1, seq_len=seq_len))
    if plan.mode != "off":  # QAT: ranges / LSQ steps from one calibration batch
        variables = calibrate_setup(cfg, plan, variables["params"], batches[:1])
    params = variables.pop("params")
    info = {"n_params": count_params(params), "losses": []}
    state = create_state(params, tx, dict(variables))
    step = make_train_step(model, cfg.family, exp.task, tx, schedule, base_rng, grad_accum=1)
    jitted = jax.jit(step, donate_argnums=(0,))
    box = [state, 0, None]

    def call():
        st, i, exe = box
        if exe is None:
            t0 = time.perf_counter()
            exe = jitted.lower(st, batches[0]).compile()
            info["compile_ms"] = (time.perf_counter() - t0) * 1e3
            info["xla_memory_mib"] = xla_memory(exe)
        st, metrics = jax.block_until_ready(exe(st, batches[i % len(batches)]))
        box[:] = [st, i + 1, exe]
        info["losses"].append(metrics["loss"])

    return call, info


def hf_case(cfg, task, batches, optim):
    from hf_steps import hf_step

    call, n, losses, hf_info = hf_step(cfg, task, batches, optim)
    return call, {"n_params": n, "losses": losses, "hf": hf_info}


def build_cases(builders: dict) -> tuple[dict, dict]:
    """Builds each case and runs two steps under :class:`PeakRSS` (build time, first step
    with compilation, second step, memory); returns ``(calls, info)``."""
    calls, info = {}, {}
    for name, make in builders.items():
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            call, inf = make()
            t1 = time.perf_counter()
            call()
            t2 = time.perf_counter()
            call()  # what the first step leaves unallocated (torch's AdamW moments)
            t3 = time.perf_counter()
        inf.update(build_s=t1 - t0, first_step_ms=(t2 - t1) * 1e3, second_step_ms=(t3 - t2) * 1e3)
        inf["rss_mib"] = mem.info()
        calls[name], info[name] = call, inf
        print(
            f"  {name}: built in {t1 - t0:.1f} s, 1st step {t2 - t1:.1f} s, "
            f"peak RSS +{inf['rss_mib']['peak_delta']:,.0f} MiB",
            flush=True,
        )
    return calls, info


def bench_config(spec: str, args, gpu: bool) -> dict:
    config = get_config(spec)
    if not gpu:
        config.model.dtype = "float32"
    if ":" not in spec:  # the full models: small batches
        if config.task == "image":
            config.data.batch_size = args.vit_batch
        else:
            config.data.batch_size, config.data.seq_len = args.batch, args.seq_len
    config.optim.grad_accum = 1
    exp = load_experiment(config)
    cfg, task = exp.model, exp.task
    b = int(config.data.batch_size)
    t = tokens_per_example(cfg, int(config.data.seq_len))
    batches = random_batches(task, cfg, b, t)
    shape = f"{b} images of {cfg.image_size}^2 ({t} tokens)" if task == "image" else f"{b} x {t}"
    print(
        f"{spec}: {task}, {cfg.family} {cfg.num_layers} layers x {cfg.hidden_size}, "
        f"batch {shape}, dtype {cfg.dtype}",
        flush=True,
    )
    builders = {}
    if "fp" in args.cases:
        builders[FP] = lambda: qtx_step(exp, exp.plan, batches, t)
    for key, setup in QAT_SETUPS.items():
        if key in args.cases:
            plan = q.QuantPlan(q.setup_rules(setup), mode="learn")
            builders[CASES[key]] = lambda plan=plan: qtx_step(exp, plan, batches, t)
    if "hf" in args.cases and not args.no_hf:
        builders[HF] = lambda: hf_case(cfg, task, batches, exp.optim)
    calls, info = build_cases(builders)
    steps = max(args.steps, 1)
    multi = {k: (lambda f=f: [f() for _ in range(steps)]) for k, f in calls.items()}
    res = measure(multi, args.repeats, min_sample_s=args.min_sample_s)  # interleaved rounds
    tokens, fw = b * t, {}
    for name, r in res.items():
        r.pop("first_call_ms")  # a warm step here: the first (compiling) one is first_step_ms
        inf = info[name]
        n = inf.pop("n_params")
        losses = inf.pop("losses")
        quiet = r["quiet_median_ms"] and r["quiet_median_ms"] / steps
        fw[name] = {
            **r,
            "step_ms": r["median_ms"] / steps,
            "quiet_step_ms": quiet,
            "tokens_per_s": tokens / r["median_ms"] * steps * 1e3,
            "images_per_s": b / r["median_ms"] * steps * 1e3 if task == "image" else None,
            "flops_per_token": 6 * n + 12 * cfg.num_layers * t * cfg.hidden_size,
            "params_no_positions": n,
            "last_losses": [float(x) for x in losses[-3:]],
            **inf,
        }
    # ratios of the same rounds (robust to drifts of the machine's load)
    pairs = {
        "qtx FP / HF tokens/s": (HF, FP),
        "W8A8 QAT / FP step time": (W8, FP),
        "W4A4 LSQ QAT / FP step time": (W4, FP),
    }
    ratios = {
        k: {"all": paired_ratio(res[a], res[b]), "quiet": paired_ratio(res[a], res[b], True)}
        for k, (a, b) in pairs.items()
        if a in res and b in res
    }
    return {
        "task": task,
        "batch": b,
        "tokens_per_example": t,
        "tokens_per_step": tokens,
        "model": dataclasses.asdict(cfg),
        "frameworks": fw,
        "ratios": ratios,
    }


def peaks(gpu: bool, n: int, repeats: int, when: str) -> dict:
    """jax matmul peaks (float32 and int8 -> int32; bfloat16 on GPUs), printed."""
    out = {"float32": matmul_peak(n, jnp.float32, repeats)}
    if gpu:
        out["bfloat16"] = matmul_peak(n, jnp.bfloat16, repeats)
    out["int8"] = int8_matmul_peak(n, repeats)
    for k, v in out.items():
        rate = f"{v['flops'] / 1e9:,.1f} G{'' if k == 'int8' else 'FL'}OP/s"
        print(f"matmul peak {k} n={n} ({when}): {rate} (jax)", flush=True)
    return out


def print_tables(title: str, results: dict, peak: dict) -> None:
    """Throughput (adds ``mfu`` and ``peak_used``), cost and ratio tables of one ISA run."""
    rows, cost, ratios = [], [], []
    for spec, res in results.items():
        use = peak.get(res["model"]["dtype"], peak["float32"])
        res["peak_used"] = {k: use[k] for k in ("n", "dtype", "flops")}
        for name, r in res["frameworks"].items():
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / use["flops"]
            nq = f"{r['quiet_samples']}/{len(r['times_ms'])}"
            mfu, vs = f"{100 * r['mfu']:.1f}%", use["dtype"]
            row = [r["tokens_per_s"], r["images_per_s"], r["step_ms"], mfu, vs]
            rows.append([short(spec), name, *row, r["quiet_step_ms"], nq])
            xla = (r.get("xla_memory_mib") or {}).get("total")
            first, comp = r["first_step_ms"] / 1e3, r.get("compile_ms")
            cost.append(
                [
                    short(spec),
                    name,
                    r["build_s"],
                    first,
                    comp and comp / 1e3,
                    r["rss_mib"]["peak_delta"],
                    xla,
                    r["params_no_positions"] / 1e6,
                ]
            )
        ratios += [[short(spec), k, v["all"], v["quiet"]] for k, v in res["ratios"].items()]
    peak_text = ", ".join(
        f"{k} {v['flops'] / 1e9:,.1f} GFLOP/s (n={v['n']})" for k, v in peak.items()
    )
    print(f"\n=== {title} ===\nMFU against the jax matmul peak of the model's dtype: {peak_text}\n")
    head = [
        "config",
        "case",
        "tokens/s",
        "img/s",
        "step ms",
        "MFU",
        "MFU vs",
        "quiet ms",
        "quiet n",
    ]
    print(table(head, rows))
    print()
    head = ["config", "case", "build s", "1st step s", "compile s", "peak RSS MiB", "XLA MiB"]
    print(table([*head, "N (M)"], cost))
    if ratios:
        print()
        print(table(["config", "ratio (median over rounds)", "all rounds", "quiet rounds"], ratios))


def isa_record(isa: str, gpu: bool) -> dict:
    """What instruction set was in force in this process."""
    from hf_steps import cpu_capability

    return {
        "requested": isa,
        "env": {k: os.environ.get(k) for k in AVX2_ENV},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "torch_cpu_capability": cpu_capability(),
        "note": f"--isa is ignored on the {jax.default_backend()} backend" if gpu else None,
    }


def run_isa(args) -> dict:
    """One run in this process's instruction set: prints its tables, returns its JSON."""
    run = Run("train_throughput")
    gpu = jax.default_backend() != "cpu"
    isa = isa_record(args.isa, gpu)
    caps = ", ".join(f"{k}={v}" for k, v in isa["env"].items() if v)
    title = f"ISA {args.isa}" + (f" (ignored on {jax.default_backend()})" if gpu else "")
    print(
        f"== {title}: torch CPU capability {isa['torch_cpu_capability']}; "
        f"XLA_FLAGS={isa['xla_flags'] or ''!r}; {caps or 'no ISA caps'}",
        flush=True,
    )
    import torch
    from hf_steps import torch_matmul_peak

    torch.set_num_threads(available_cores())
    specs = args.configs or (SPECS[:1] if args.quick else SPECS)
    n = 4096 if gpu else 1024 if args.quick else 2048
    peak_start = peaks(gpu, n, args.repeats, "start")
    peak_torch = None if gpu else torch_matmul_peak(n, args.repeats, measure)
    if peak_torch:
        gflops = peak_torch["flops"] / 1e9
        print(f"matmul peak float32 n={n}: {gflops:,.1f} GFLOP/s (torch, for reference)")
    results = {}
    for spec in specs:
        results[spec] = bench_config(spec, args, gpu)
        gc.collect()
    peak_end = peaks(gpu, n, args.repeats, "end")
    # MFU against the higher of the two: a peak measured while others load the CPU is low
    peak = {k: max(v, peak_end[k], key=lambda r: r["flops"]) for k, v in peak_start.items()}
    print_tables(title, results, peak)
    elapsed, busy = time.perf_counter() - run.t0, run.others.cores()
    print(f"\n{title}: {elapsed:.1f} s; other processes kept {busy:.2f} cores busy meanwhile")
    machine = {**run.machine, "load_average_at_end": os.getloadavg()}
    return {
        "backend": jax.default_backend(),
        "isa": isa,
        "machine": {**machine, "other_processes_busy_cores": busy},
        "settings": vars(args),
        "matmul_peak": {"start": peak_start, "end": peak_end, "used_for_mfu": peak},
        "matmul_peak_torch": peak_torch,
        "configs": results,
        "elapsed_s": elapsed,
    }


def strip_args(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--x v`` and ``--x=v`` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(f"{n}=" for n in names)):
            out.append(a)
    return out


def run_children(args) -> dict[str, dict]:
    """``--isa both``: this script once per ISA in a child process with that environment."""
    argv = strip_args(sys.argv[1:], ("--isa", "--out", "--run_json"))
    runs = {}
    for isa in ISAS:
        fd, path = tempfile.mkstemp(prefix=f"train_throughput_{isa}_", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--isa", isa, "--run_json", path]
        print(f"\n##### ISA {isa}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, env=isa_env(isa, os.environ)).returncode
        try:
            with open(path) as f:
                runs[isa] = json.load(f)
        except (OSError, ValueError):
            runs[isa] = {"error": f"the {isa} run exited with status {rc} and wrote no results"}
        finally:
            os.unlink(path)
        if runs[isa].get("backend", "cpu") != "cpu":
            print(f"--isa is ignored on the {runs[isa]['backend']} backend: one run only")
            break
    return runs


def print_isa_comparison(runs: dict) -> None:
    """avx2 / native step time per case, when both runs succeeded."""
    a, b = runs.get("native", {}), runs.get("avx2", {})
    if "configs" not in a or "configs" not in b:
        return
    pa, pb = a["matmul_peak"]["used_for_mfu"], b["matmul_peak"]["used_for_mfu"]
    rows = [["matmul peak", "jax float32", pa["float32"]["median_ms"], pb["float32"]["median_ms"]]]
    for spec, res in a["configs"].items():
        for name, r in res["frameworks"].items():
            other = b["configs"].get(spec, {}).get("frameworks", {}).get(name)
            if other:
                rows.append([short(spec), name, r["step_ms"], other["step_ms"]])
    rows = [[*r, r[3] / r[2]] for r in rows]
    print("\n=== native vs avx2 (medians; each run timed separately) ===\n")
    print(table(["config", "case", "native ms", "avx2 ms", "avx2 / native"], rows))


def main():
    p = base_parser(__doc__, "train_throughput")
    p.allow_abbrev = False  # --isa is read from sys.argv before argparse runs
    p.add_argument(
        "--isa",
        choices=(*ISAS, "both"),
        default="both",
        help="CPU instruction set (both: one child process per ISA, default)",
    )
    p.add_argument("--configs", nargs="*", default=None, help="config specs (path[:arg])")
    cases = ", ".join(f"{k} ({v})" for k, v in CASES.items())
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help=cases)
    p.add_argument("--batch", type=int, default=2, help="full text models: sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="full text models: tokens per sequence")
    p.add_argument("--vit_batch", type=int, default=8, help="full ViT: images per step")
    p.add_argument("--steps", type=int, default=1, help="train steps per timed sample")
    p.add_argument("--no_hf", action="store_true", help="skip the HF PyTorch comparison")
    p.add_argument("--min_sample_s", type=float, default=0.3, help="min seconds per sample")
    p.add_argument("--run_json", help=argparse.SUPPRESS)  # a child's results (--isa both)
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    args = p.parse_args()
    if args.readme_only:
        with open(args.out) as f:
            return rewrite_readme("bench:train_throughput", readme_block(json.load(f)))
    t0 = time.perf_counter()
    if args.isa == "both":
        runs = run_children(args)
        print_isa_comparison(runs)
    else:
        runs = {args.isa: run_isa(args)}
        if args.run_json:
            write_json(args.run_json, runs[args.isa])
            return
    first = next((r for r in runs.values() if "machine" in r), {})
    write_json(
        args.out,
        {
            "benchmark": "train_throughput",
            "machine": first.get("machine"),
            "settings": vars(args),
            "flops_per_token": FLOPS,
            "isa": runs,
            "elapsed_s": time.perf_counter() - t0,
        },
    )
    failed = [k for k, r in runs.items() if "error" in r]
    if failed:
        sys.exit(f"failed: {', '.join(runs[k]['error'] for k in failed)}")
    if args.isa == "both" and args.configs is None and not args.quick:  # the README's run
        with open(args.out) as f:
            rewrite_readme("bench:train_throughput", readme_block(json.load(f)))


if __name__ == "__main__":
    main()
