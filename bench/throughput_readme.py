"""The README's training-throughput table from ``bench/results/train_throughput.json``
(``python bench/train_throughput.py`` rewrites it; ``--readme_only`` rewrites it from the
JSON alone)."""

from __future__ import annotations

NAMES = {
    "configs/opt125m_gated.py:tiny": "opt125m_gated `:tiny`",
    "configs/opt125m_gated.py": "opt-125m",
    "configs/bert_base_vanilla.py": "BERT-base MLM",
    "configs/vit_s16_vanilla.py": "ViT-S/16",
}
ISA_NAMES = {"native": None, "avx2": "AVX2"}
ISA_SHOWN = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx512f", "avx_vnni", "avx2")


def _native_name(machine: dict) -> str:
    isa = machine.get("cpu_isa", [])
    return "AMX" if "amx_int8" in isa else "AVX-512" if "avx512f" in isa else "AVX2"


def _batch(res: dict) -> str:
    if res["model"]["family"] == "vit":
        return f"{res['batch']} images"
    return f"{res['batch']} x {res['tokens_per_example']}"


def _speed(r: dict) -> str:
    if r.get("images_per_s"):
        return f"{r['images_per_s']:.2f} img/s"
    return f"{r['tokens_per_s']:,.0f}"


def readme_block(payload: dict) -> str:
    """Machine line (CPU, instruction sets, measured peaks per ISA) and the table."""
    runs = {k: v for k, v in payload["isa"].items() if "configs" in v}
    first = next(iter(runs.values()))
    m = first["machine"]
    isa = ", ".join(f for f in ISA_SHOWN if f in m.get("cpu_isa", []))
    peaks = []
    for name, run in runs.items():
        label = ISA_NAMES.get(name) or _native_name(m)
        jax_peak = run["matmul_peak"]["used_for_mfu"]["float32"]["flops"] / 1e9
        torch = run.get("matmul_peak_torch")
        text = f"{label}: float32 {jax_peak:.0f} GFLOP/s jax"
        if torch:
            text += f", {torch['flops'] / 1e9:.0f} PyTorch"
        int8 = run["matmul_peak"].get("int8")
        if int8:
            text += f", int8 {int8['flops'] / 1e9:.0f} GOP/s jax"
        peaks.append(text)
    head = (
        f"Machine: {m['cpu']}, {m['cpu_cores_available']} cores ({isa}). Measured matmul "
        f"peaks (2048^2) per ISA run: {'; '.join(peaks)}.\n\n"
    )
    cols = [
        "model (batch)",
        "ISA",
        "qtx FP tokens/s",
        "HF tokens/s",
        "qtx / HF",
        "MFU qtx / HF",
        "W8A8 / FP",
        "W4A4 / FP",
        "compile s (FP)",
        "peak RSS MiB qtx / HF",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    specs = list(first["configs"])
    for spec in specs:
        for i, (name, run) in enumerate(runs.items()):
            res = run["configs"].get(spec)
            if res is None:
                continue
            fw, ratios = res["frameworks"], res["ratios"]
            fp, hf = fw.get("qtx FP"), fw.get("HF torch")

            def ratio(key, ratios=ratios):
                v = ratios.get(key, {}).get("all")
                return "" if v is None else f"{v:.2f}"

            rss = lambda r: f"{r['rss_mib']['peak_delta']:,.0f}" if r else "-"  # noqa: E731
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"{NAMES.get(spec, spec)} ({_batch(res)})" if i == 0 else "",
                        ISA_NAMES.get(name) or _native_name(m),
                        _speed(fp) if fp else "-",
                        _speed(hf) if hf else "-",
                        f"**{ratio('qtx FP / HF tokens/s')}**",
                        f"{100 * fp['mfu']:.1f} % / {100 * hf['mfu']:.1f} %" if fp and hf else "-",
                        ratio("W8A8 QAT / FP step time"),
                        ratio("W4A4 LSQ QAT / FP step time"),
                        f"{fp['compile_ms'] / 1e3:.1f}" if fp and fp.get("compile_ms") else "-",
                        f"{rss(fp)} / {rss(hf)}",
                    ]
                )
                + " |"
            )
    return head + "\n".join(lines)
